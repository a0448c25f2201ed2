"""Metric-learning losses and miners: one registry over pytorch-metric-learning, plus what PML
lacks (AdaCos) and the softmax baseline.

Like PML, a loss is separate from its miner: :func:`build_loss` returns both (the miner is None
where none is configured). Losses with parameters (class weights, proxies) are optimised in
their own param group (``medml.train``). The names and how each is built are in
:mod:`medml.losses.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medml.losses.registry import LOSSES, MINERS, build_loss_module

if TYPE_CHECKING:
    from torch import nn

    from medml.config import LossConfig


@dataclass
class LossBundle:
    """A loss, its optional miner, and whether the loss has trainable parameters."""

    loss: nn.Module
    miner: Any

    @property
    def has_parameters(self) -> bool:
        return any(True for _ in self.loss.parameters())


def build_loss(cfg: LossConfig, n_classes: int, embedding_dim: int) -> LossBundle:
    """Build the configured loss and miner; unset options keep the library's defaults."""
    loss, miner = build_loss_module(cfg, n_classes, embedding_dim)
    return LossBundle(loss, miner)


__all__ = ["LOSSES", "MINERS", "LossBundle", "build_loss"]
