"""Patient-level stratified splits: no patient ever appears in two splits."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from medml.catalog import Catalog
from medml.config import SplitConfig


def assign_splits(scans: Sequence[dict[str, Any]], cfg: SplitConfig) -> dict[str, str]:
    """Map scan id -> train/val/test, grouping scans by patient and stratifying by label.

    A patient's label for stratification is the label of their first scan; within each class,
    patients are shuffled with ``cfg.seed`` and cut by the configured fractions (at least one
    patient goes to val and test whenever a class has three or more patients).

    Patients and scans are ordered by content (the voxel hash), not by their keyed ids: the
    keys depend on each workspace's secret, and the same data must get the same split in
    every workspace, or no two runs of the demo would be comparable.
    """
    patients: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in sorted(scans, key=_content_order):
        patients[s["patient_key"]].append(s)
    by_class: dict[str, list[str]] = defaultdict(list)
    for key in sorted(patients, key=lambda k: _content_order(patients[k][0])):
        by_class[str(patients[key][0]["label"])].append(key)

    rng = np.random.default_rng(cfg.seed)
    out: dict[str, str] = {}
    for label in sorted(by_class):
        keys = list(by_class[label])
        rng.shuffle(keys)
        n = len(keys)
        n_test = max(1, round(n * cfg.test)) if n >= 3 and cfg.test > 0 else 0
        n_val = max(1, round(n * cfg.val)) if n >= 3 and cfg.val > 0 else 0
        for i, key in enumerate(keys):
            split = "test" if i < n_test else "val" if i < n_test + n_val else "train"
            for s in patients[key]:
                out[s["scan_id"]] = split
    return out


def _content_order(scan: dict[str, Any]) -> tuple[str, str]:
    """Sort key independent of the de-identification secret (scan id only breaks ties)."""
    return (scan.get("content_hash") or "", scan["scan_id"])


def ensure_splits(catalog: Catalog, cfg: SplitConfig) -> list[dict[str, Any]]:
    """Assign patient-level splits when any labelled scan lacks one; return all labelled scans."""
    scans = catalog.list_scans()
    if any(s["split"] is None for s in scans):
        catalog.set_splits(assign_splits(scans, cfg))
        scans = catalog.list_scans()
    return scans


def patient_folds(
    scans: Sequence[dict[str, Any]], k: int, seed: int = 0
) -> list[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """``k`` (train, held-out) pairs: patient-grouped, class-stratified folds of ``scans``
    (scikit-learn's StratifiedGroupKFold over content-ordered scans, seeded)."""
    from sklearn.model_selection import StratifiedGroupKFold

    ordered = sorted(scans, key=_content_order)
    labels = [str(s["label"]) for s in ordered]
    groups = [s["patient_key"] for s in ordered]
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [
        ([ordered[i] for i in fit], [ordered[i] for i in held])
        for fit, held in cv.split(ordered, labels, groups)
    ]
