"""Embedding datasets and catalog scans with an encoder, in batches, without gradients."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medml.config import PreprocessConfig
from medml.data.dataset import cached_dataset, items_from_scans
from medml.data.transforms import KEY
from medml.models.encoder import Encoder
from medml.workspace import Workspace


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def embed_volumes(
    encoder: torch.nn.Module, vols: Sequence[torch.Tensor | None], dim: int
) -> np.ndarray:
    """Embeddings ``(len(vols), dim)`` of network-ready volumes in one forward pass on the
    encoder's device, a row of NaN for each ``None`` (an input that could not be prepared)."""
    emb = np.full((len(vols), dim), np.nan, dtype=np.float32)
    rows = [i for i, v in enumerate(vols) if v is not None]
    if rows:
        dev = next(encoder.parameters()).device
        batch = torch.stack([vols[i] for i in rows]).to(dev)
        emb[rows] = encoder(batch).float().cpu().numpy()
    return emb


@dataclass
class Embedded:
    """Embeddings of a set of catalog scans with their class names and ids."""

    emb: np.ndarray
    labels: np.ndarray
    scan_ids: list[str]

    def __len__(self) -> int:
        return len(self.labels)


@torch.no_grad()
def embed_dataset(
    encoder: Encoder, dataset: Dataset, batch_size: int = 16, num_workers: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings ``(N, E)`` and integer labels ``(N,)`` in dataset order."""
    dev = device()
    encoder.eval().to(dev)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
    )
    embs, labels = [], []
    for batch in loader:
        embs.append(encoder(batch[KEY].to(dev, non_blocking=True)).float().cpu().numpy())
        labels.append(np.asarray(batch["label"]))
    if not embs:
        return np.zeros((0, 0), np.float32), np.zeros(0, int)
    return np.concatenate(embs), np.concatenate(labels)


def embed_scans(
    encoder: Encoder,
    ws: Workspace,
    pp: PreprocessConfig,
    scans: Sequence[dict[str, Any]],
    batch_size: int,
) -> Embedded:
    """Embed catalog scans through the persistent cache."""
    dataset = cached_dataset(ws, pp, items_from_scans(ws, scans, []))
    emb, _ = embed_dataset(encoder, dataset, batch_size)
    return Embedded(emb, np.array([s["label"] for s in scans]), [s["scan_id"] for s in scans])
