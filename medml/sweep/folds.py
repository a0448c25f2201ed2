"""Cross-validation folds over train+val: patient-grouped, class-stratified, seeded.

The folds are ``medml.data.splits.patient_folds`` (scikit-learn's ``StratifiedGroupKFold``);
this module refuses data those folds cannot stratify and names the folds by scan id, so a
fold travels as plain data to another process. The test split never enters a fold: it is
evaluated once, at the end of the protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from medml.data.splits import patient_folds


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
    per_class: dict[str, set[str]] = {}
    for s in scans:
        per_class.setdefault(str(s["label"]), set()).add(s["patient_key"])
    short = {c: len(p) for c, p in per_class.items() if len(p) < k}
    if short:
        raise ValueError(
            f"{k} folds need at least {k} patients per class in train+val; "
            f"too few in {', '.join(f'{c} ({n})' for c, n in sorted(short.items()))}"
        )
    return [
        Fold(i, tuple(s["scan_id"] for s in fit), tuple(s["scan_id"] for s in held))
        for i, (fit, held) in enumerate(patient_folds(scans, k, seed))
    ]


def pick(scans: Sequence[dict[str, Any]], ids: Sequence[str]) -> list[dict[str, Any]]:
    """The catalog rows of ``ids``, in the catalog's (content) order."""
    wanted = set(ids)
    return [s for s in scans if s["scan_id"] in wanted]
