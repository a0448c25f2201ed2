"""Encoder = MONAI 3D backbone (features only) + MLP projection head + L2 normalisation."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks import nets
from torch import nn

from medml.config import ModelConfig

log = logging.getLogger(__name__)


def _resnet(factory: Callable[..., nn.Module]) -> Callable[[ModelConfig], nn.Module]:
    def build(cfg: ModelConfig) -> nn.Module:
        # conv1_t_stride=2 halves the first feature map in depth too: ~10x faster in 3D.
        return factory(
            spatial_dims=3,
            n_input_channels=1,
            conv1_t_stride=cfg.conv1_t_stride,
            widen_factor=cfg.widen_factor,
            feed_forward=False,
            shortcut_type="B",
        )

    return build


def _densenet121(cfg: ModelConfig) -> nn.Module:
    net = nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=1)
    net.class_layers.out = nn.Identity()  # keep relu + pool + flatten: pooled features
    return net


def _efficientnet(variant: str) -> Callable[[ModelConfig], nn.Module]:
    def build(cfg: ModelConfig) -> nn.Module:
        net = nets.EfficientNetBN(
            variant, spatial_dims=3, in_channels=1, num_classes=1, pretrained=False
        )
        net._fc = nn.Identity()
        return net

    return build


def _seresnet50(cfg: ModelConfig) -> nn.Module:
    net = nets.SEResNet50(spatial_dims=3, in_channels=1, num_classes=1)
    net.last_linear = nn.Identity()
    return net


BACKBONES: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "resnet10": _resnet(nets.resnet10),
    "resnet18": _resnet(nets.resnet18),
    "resnet34": _resnet(nets.resnet34),
    "resnet50": _resnet(nets.resnet50),
    "densenet121": _densenet121,
    "seresnet50": _seresnet50,
    **{f"efficientnet-b{i}": _efficientnet(f"efficientnet-b{i}") for i in range(3)},
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


def load_backbone_weights(backbone: nn.Module, path: Path) -> None:
    """Load a local state dict into the backbone (never unpickles: ``weights_only=True``).

    Accepts a bare state dict or one under ``state_dict`` (MedicalNet), strips a ``module.``
    prefix, and loads non-strictly, logging what did not match (e.g. a classifier layer).
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = backbone.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"{path}: no tensor matches the {type(backbone).__name__} backbone")
    backbone.load_state_dict(usable, strict=False)
    log.info("loaded %d/%d backbone tensors from %s", len(usable), len(own), path)


def build_encoder(cfg: ModelConfig) -> Encoder:
    """Build the configured backbone without its classifier, and the head on top."""
    backbone = BACKBONES[cfg.backbone](cfg)
    if cfg.init_weights is not None:
        load_backbone_weights(backbone, Path(cfg.init_weights))
    with torch.no_grad():
        backbone.eval()
        feature_dim = backbone(torch.zeros(1, 1, 32, 32, 32)).flatten(1).shape[1]
    backbone.train()
    return Encoder(backbone, feature_dim, cfg)
