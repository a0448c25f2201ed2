"""One factory over pytorch-metric-learning losses and miners, chosen in config."""

from __future__ import annotations

from pytorch_metric_learning import losses, miners
from torch import nn

from medml.config import LossConfig


def build_loss(
    cfg: LossConfig, n_classes: int, embedding_dim: int
) -> tuple[nn.Module, nn.Module | None]:
    """Return ``(loss, miner)``; the miner is None for losses that need none."""
    if cfg.name == "triplet":
        loss = losses.TripletMarginLoss(margin=cfg.margin)
        miner = miners.TripletMarginMiner(margin=cfg.margin, type_of_triplets=cfg.miner)
        return loss, miner
    raise ValueError(f"unknown loss {cfg.name!r}")
