"""Encoder = MONAI 3D backbone (features only, see ``backbones``) + MLP head + L2 normalisation."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medml.config import ModelConfig
from medml.models.backbones import BACKBONES

log = logging.getLogger(__name__)


class Encoder(nn.Module):
    """Maps a ``(B, 1, D, H, W)`` volume batch to unit-length embeddings ``(B, E)``.

    In eval mode with ``model.tta_flips`` set, the embedding is test-time augmented: the mean
    of the embeddings of the volume and of each listed flip (spatial axes 0, 1, 2 = R-L, A-P,
    S-I after RAS orientation), renormalised. Training (train mode) never averages.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.tta_flips = [tuple(int(a) + 2 for a in flips) for flips in cfg.tta_flips]
        self.backbone = backbone
        self.head = nn.Sequential(
            nn.Linear(feature_dim, cfg.head_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.head_hidden, cfg.embedding_dim),
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """One forward pass, no test-time augmentation."""
        return F.normalize(self.head(self.backbone(x)), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.tta_flips:
            return self.embed(x)
        views = [self.embed(x)] + [self.embed(x.flip(dims)) for dims in self.tta_flips]
        return F.normalize(torch.stack(views).mean(dim=0), dim=1)


class EnsembleEncoder(nn.Module):
    """K encoders (e.g. the models of K cross-validation folds) as one: the concatenation of
    their unit embeddings, divided by sqrt(K), is again unit length, so cosine similarity of
    ensemble embeddings is the mean of the members' similarities (the Reality Check's fold
    ensemble)."""

    def __init__(self, members: list[Encoder]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.members], dim=1) / len(self.members) ** 0.5


def load_backbone_weights(backbone: nn.Module, path: Path) -> None:
    """Load a local state dict into the backbone (never unpickles: ``weights_only=True``).

    Accepts a bare state dict or one under ``state_dict`` (MedicalNet), strips a ``module.``
    prefix, and loads non-strictly, logging what did not match (e.g. a classifier layer).
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    load_matching(backbone, state, str(path))


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> int:
    """Load the tensors of ``state`` whose names and shapes match ``module``'s, logging how
    many (a classifier or another head stays as initialised); refuse when none matches."""
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"{source}: no tensor matches this {type(module).__name__}")
    module.load_state_dict(usable, strict=False)
    log.info(
        "loaded %d/%d %s tensors from %s", len(usable), len(own), type(module).__name__, source
    )
    return len(usable)


def build_encoder(cfg: ModelConfig) -> Encoder | EnsembleEncoder:
    """Build the configured backbone without its classifier, and the head on top (with
    ``model.ensemble`` > 1: that many of them, as one :class:`EnsembleEncoder`)."""
    if cfg.ensemble > 1:
        single = cfg.model_copy(update={"ensemble": 1})
        return EnsembleEncoder([build_encoder(single) for _ in range(cfg.ensemble)])
    backbone = BACKBONES[cfg.backbone].build(cfg)
    if cfg.init_weights is not None:
        load_backbone_weights(backbone, Path(cfg.init_weights))
    with torch.no_grad():
        backbone.eval()
        feature_dim = backbone(torch.zeros(1, 1, 32, 32, 32)).flatten(1).shape[1]
    backbone.train()
    return Encoder(backbone, feature_dim, cfg)


def load_encoder(cfg: ModelConfig, state_path: Path) -> Encoder | EnsembleEncoder:
    """The configured encoder with weights from a state dict file (``weights_only=True``)."""
    encoder = build_encoder(cfg.model_copy(update={"init_weights": None}))  # trained weights win
    encoder.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    return encoder.eval()
