"""Encoder = MONAI 3D backbone (features only) + MLP projection head + L2 normalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks import nets
from torch import nn

from medml.config import ModelConfig

_RESNETS = {
    "resnet10": nets.resnet10,
    "resnet18": nets.resnet18,
    "resnet34": nets.resnet34,
    "resnet50": nets.resnet50,
}


class Encoder(nn.Module):
    """Maps a ``(B, 1, D, H, W)`` volume batch to unit-length embeddings ``(B, E)``."""

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(
            nn.Linear(feature_dim, cfg.head_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.head_hidden, cfg.embedding_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=1)


def build_encoder(cfg: ModelConfig) -> Encoder:
    """Build the configured backbone without its classifier, and the head on top."""
    # conv1_t_stride=2 halves the first feature map in depth too: ~10x faster in 3D.
    backbone = _RESNETS[cfg.backbone](
        spatial_dims=3,
        n_input_channels=1,
        conv1_t_stride=cfg.conv1_t_stride,
        widen_factor=cfg.widen_factor,
        feed_forward=False,
        shortcut_type="B",
    )
    with torch.no_grad():
        backbone.eval()
        feature_dim = backbone(torch.zeros(1, 1, 16, 16, 16)).shape[1]
    backbone.train()
    return Encoder(backbone, feature_dim, cfg)
