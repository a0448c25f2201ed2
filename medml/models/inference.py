"""Embedding a dataset with an encoder, in batches, without gradients."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medml.data.transforms import KEY
from medml.models.encoder import Encoder


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
