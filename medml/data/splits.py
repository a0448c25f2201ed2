"""Patient-level stratified splits: no patient ever appears in two splits."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medml.catalog import Catalog
from medml.config import SplitConfig


def assign_splits(
    scans: Sequence[dict[str, Any]], cfg: SplitConfig, fixed: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Map scan id -> train/val/test, grouping scans by patient and stratifying by label.

    A patient's label for stratification is the label of their first scan; within each class,
    patients are shuffled with ``cfg.seed`` and cut by the configured fractions (at least one
    patient goes to val and test whenever a class has three or more patients).

    ``fixed`` holds splits already given (scan id -> split); they never change. A new scan of
    a patient who has one joins that patient's split; new patients fill, in the shuffled order,
    what the class's val and test still lack of their share of all its patients, then train.
    With nothing fixed this is the plain cut above.

    Patients and scans are ordered by content (the voxel hash), not by their keyed ids: the
    keys depend on each workspace's secret, and the same data must get the same split in
    every workspace, or no two runs of the demo would be comparable.
    """
    fixed = dict(fixed or {})
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
        want = {
            "test": max(1, round(n * cfg.test)) if n >= 3 and cfg.test > 0 else 0,
            "val": max(1, round(n * cfg.val)) if n >= 3 and cfg.val > 0 else 0,
        }
        known = {k: _patient_split(patients[k], fixed) for k in keys}
        have = Counter(split for split in known.values() if split)
        for key in keys:
            split = known[key]
            if split is None:
                split = next((x for x in ("test", "val") if have[x] < want[x]), "train")
                have[split] += 1
            for s in patients[key]:
                out[s["scan_id"]] = fixed.get(s["scan_id"], split)
    return out


def _patient_split(scans: Sequence[dict[str, Any]], fixed: Mapping[str, str]) -> str | None:
    """The split of a patient's scans that have one (the most common, should they differ)."""
    given = Counter(fixed[s["scan_id"]] for s in scans if s["scan_id"] in fixed)
    return given.most_common(1)[0][0] if given else None


def _content_order(scan: dict[str, Any]) -> tuple[str, str]:
    """Sort key independent of the de-identification secret (scan id only breaks ties)."""
    return (scan.get("content_hash") or "", scan["scan_id"])


def ensure_splits(catalog: Catalog, cfg: SplitConfig) -> list[dict[str, Any]]:
    """Give a split to every labelled scan that lacks one; return all labelled scans.

    Scans that have a split keep it for ever, so a model's test scans stay test scans however
    much is ingested later (only new scans are assigned, by :func:`assign_splits`).
    """
    scans = catalog.list_scans()
    if any(s["split"] is None for s in scans):
        fixed = {s["scan_id"]: s["split"] for s in scans if s["split"] is not None}
        assigned = assign_splits(scans, cfg, fixed)
        catalog.set_splits({k: v for k, v in assigned.items() if k not in fixed})
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
