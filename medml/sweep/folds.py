"""Cross-validation folds over train+val: patient-grouped, class-stratified, seeded.

The test split never enters a fold: it is evaluated once, at the end of the protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sklearn.model_selection import StratifiedGroupKFold


@dataclass(frozen=True)
class Fold:
    """One fold: the scans a fit trains on and the scans it is validated on (by scan id)."""

    index: int
    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...]


def make_folds(scans: Sequence[dict[str, Any]], k: int, seed: int) -> list[Fold]:
    """``k`` folds of ``scans`` (catalog rows); a patient's scans all fall in one fold.

    Refuses data with fewer patients in some class than folds: such a fold could not be
    stratified, and its validation score would not measure that class.
    """
    labels = [s["label"] for s in scans]
    groups = [s["patient_key"] for s in scans]
    per_class: dict[str, set[str]] = {}
    for label, group in zip(labels, groups):
        per_class.setdefault(label, set()).add(group)
    short = {c: len(p) for c, p in per_class.items() if len(p) < k}
    if short:
        raise ValueError(
            f"{k} folds need at least {k} patients per class in train+val; "
            f"too few in {', '.join(f'{c} ({n})' for c, n in sorted(short.items()))}"
        )
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    ids = [s["scan_id"] for s in scans]
    folds = []
    for index, (train_idx, val_idx) in enumerate(splitter.split(ids, labels, groups)):
        folds.append(Fold(index, tuple(ids[i] for i in train_idx), tuple(ids[i] for i in val_idx)))
    return folds


def pick(scans: Sequence[dict[str, Any]], ids: Sequence[str]) -> list[dict[str, Any]]:
    """The catalog rows of ``ids``, in the catalog's (content) order."""
    wanted = set(ids)
    return [s for s in scans if s["scan_id"] in wanted]
