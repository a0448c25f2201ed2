"""One factory over pytorch-metric-learning losses and miners, plus AdaCos and a softmax baseline.

Like PML, a loss is separate from its miner: ``build_loss`` returns both (the miner is None
for losses that weigh all pairs themselves). Losses with parameters (class weights, proxies)
are optimised in their own param group, see ``medml.train``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pytorch_metric_learning import losses, miners
from torch import nn

from medml.config import LossConfig
from medml.losses.adacos import AdaCosLoss
from medml.losses.softmax import SoftmaxLoss

_TRIPLET_MINERS = {"semihard": "semihard", "hard": "hard", "all": "all"}


@dataclass
class LossBundle:
    """A loss, its optional miner, and whether the loss has trainable parameters."""

    loss: nn.Module
    miner: nn.Module | None

    @property
    def has_parameters(self) -> bool:
        return any(True for _ in self.loss.parameters())


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def build_loss(cfg: LossConfig, n_classes: int, embedding_dim: int) -> LossBundle:
    """Build the configured loss; margins and scales fall back to each paper's defaults."""
    name, c, e = cfg.name, n_classes, embedding_dim
    if name == "triplet":
        margin = _or(cfg.margin, 0.2)
        miner = (
            miners.BatchHardMiner()
            if cfg.miner == "batch-hard"
            else miners.TripletMarginMiner(
                margin=margin, type_of_triplets=_TRIPLET_MINERS[cfg.miner]
            )
        )
        return LossBundle(losses.TripletMarginLoss(margin=margin), miner)
    if name == "arcface":  # PML's margin is in degrees
        return LossBundle(
            losses.ArcFaceLoss(
                num_classes=c,
                embedding_size=e,
                margin=_or(cfg.margin, 28.6),
                scale=_or(cfg.scale, 64.0),
            ),
            None,
        )
    if name == "subcenter-arcface":
        return LossBundle(
            losses.SubCenterArcFaceLoss(
                num_classes=c,
                embedding_size=e,
                margin=_or(cfg.margin, 28.6),
                scale=_or(cfg.scale, 64.0),
                sub_centers=cfg.subcenters,
            ),
            None,
        )
    if name == "cosface":
        return LossBundle(
            losses.CosFaceLoss(
                num_classes=c,
                embedding_size=e,
                margin=_or(cfg.margin, 0.35),
                scale=_or(cfg.scale, 64.0),
            ),
            None,
        )
    if name == "adacos":
        return LossBundle(AdaCosLoss(c, e, dynamic=cfg.adacos_dynamic), None)
    if name == "proxy-anchor":
        return LossBundle(
            losses.ProxyAnchorLoss(
                num_classes=c, embedding_size=e, margin=_or(cfg.margin, 0.1), alpha=32
            ),
            None,
        )
    if name == "multi-similarity":
        return LossBundle(
            losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5),
            miners.MultiSimilarityMiner(epsilon=0.1),
        )
    if name == "supcon":
        return LossBundle(losses.SupConLoss(temperature=cfg.temperature), None)
    if name == "softmax":
        return LossBundle(SoftmaxLoss(c, e), None)
    raise ValueError(f"unknown loss {name!r}")


__all__ = ["AdaCosLoss", "LossBundle", "SoftmaxLoss", "build_loss"]
