"""Training checkpoints: written atomically every epoch, read with ``weights_only=True``.

``last.pt`` holds everything needed to continue (model, loss parameters, optimiser,
scheduler, grad scaler, counters); ``best.pt`` holds the encoder of the best epoch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from medml.io import atomic_path


@dataclass
class Progress:
    """Counters that decide what happens next; saved inside ``last.pt``."""

    epoch: int = 0
    best_score: float = -1.0
    best_epoch: int = 0
    stale_epochs: int = 0
    finished: bool = False


def save(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)


def save_last(path: Path, run_id: str, progress: Progress, states: dict[str, Any]) -> None:
    save(path, {"run_id": run_id, "progress": asdict(progress), **states})


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def find_resumable(checkpoints: Path) -> Path | None:
    """The most recently written ``last.pt`` of a run that did not finish."""
    candidates = sorted(
        checkpoints.glob("*/last.pt"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for path in candidates:
        if not load(path)["progress"]["finished"]:
            return path
    return None
