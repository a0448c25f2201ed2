"""Stable splits (issue 15, item 5): a scan keeps its split for ever; only new scans get one.

Before, any labelled scan without a split re-split the whole catalog (19 of 34 old scans
moved), and an ingest that had read its rows before a training assigned splits wrote them
back without (every split NULL).
"""

from __future__ import annotations

import shutil
from collections import defaultdict

from medml.catalog import Catalog
from medml.config import SplitConfig
from medml.data.splits import ensure_splits
from medml.ingest import ingest
from medml.workspace import Workspace


def _patients_in_one_split(scans: list[dict]) -> bool:
    splits = defaultdict(set)
    for s in scans:
        splits[s["patient_key"]].add(s["split"])
    return all(len(v) == 1 for v in splits.values())


def _row(i: int, patient: int, label: str) -> dict:
    return {
        "scan_id": f"s{i:03d}",
        "patient_key": f"p{patient:03d}",
        "label": label,
        "content_hash": f"{i * 7919 % 1000:04d}",
        "volume": f"volumes/s{i:03d}.nii.gz",
    }


def test_old_scans_keep_their_split_and_new_patients_fill_the_shares(tmp_path):
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    cfg = SplitConfig(seed=4)
    first = [_row(i, i, f"C{i % 2}") for i in range(20)]
    catalog.upsert_scans(first)
    before = {s["scan_id"]: s["split"] for s in ensure_splits(catalog, cfg)}
    assert set(before.values()) == {"train", "val", "test"}
    # later: a second scan of ten known patients, and thirty new patients
    later = [_row(100 + i, i, f"C{i % 2}") for i in range(10)]
    later += [_row(200 + i, 50 + i, f"C{i % 2}") for i in range(30)]
    catalog.upsert_scans(later)
    after = ensure_splits(catalog, cfg)
    split_of = {s["scan_id"]: s["split"] for s in after}
    assert {k: split_of[k] for k in before} == before  # nothing old moved
    assert all(split_of[f"s{100 + i:03d}"] == before[f"s{i:03d}"] for i in range(10))
    assert _patients_in_one_split(after)
    new = [split_of[f"s{200 + i:03d}"] for i in range(30)]
    assert {"train", "val", "test"} <= set(new)  # the same stratified rule for new patients
    for label in ("C0", "C1"):
        patients = {s["patient_key"]: s["split"] for s in after if s["label"] == label}
        share = sum(v == "test" for v in patients.values()) / len(patients)
        assert 0.1 <= share <= 0.3, (label, share)


def test_rows_written_back_without_a_split_keep_the_stored_one(tmp_path):
    """An ingest reads the catalog, a training assigns splits, the ingest writes its rows."""
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    catalog.upsert_scans([_row(i, i, "A") for i in range(6)])
    read_by_ingest = catalog.scans_by_id()  # before the training: no splits
    assigned = {s["scan_id"]: s["split"] for s in ensure_splits(catalog, SplitConfig())}
    catalog.upsert_scans([dict(r, split=None) for r in read_by_ingest.values()])
    assert {s["scan_id"]: s["split"] for s in catalog.list_scans()} == assigned
    assert all(assigned.values())


def test_ingest_train_ingest_more_moves_no_old_scan(tmp_path, tiny_raw, tiny_settings):
    """Real ingests: first half the export (first studies only), splits, then all of it."""
    part = tmp_path / "part"
    for study in sorted((tiny_raw / "dicom").glob("case-000[0-7]/study-1")):
        shutil.copytree(study, part / study.relative_to(tiny_raw))
    for nii in sorted((tiny_raw / "nifti").glob("case-000[0-9]-study-1.nii.gz")):
        (part / "nifti").mkdir(parents=True, exist_ok=True)
        shutil.copy2(nii, part / "nifti" / nii.name)
    ws = Workspace(tmp_path / "ws")
    labels, cfg = tiny_raw / "labels.csv", tiny_settings.ingest
    ingest(part, ws, labels, cfg, progress=False)
    catalog = Catalog(ws.catalog_url)
    before = {s["scan_id"]: s["split"] for s in ensure_splits(catalog, tiny_settings.split)}
    ingest(tiny_raw, ws, labels, cfg, progress=False)
    after = ensure_splits(catalog, tiny_settings.split)
    assert len(after) > len(before) >= 8
    assert {s["scan_id"]: s["split"] for s in after if s["scan_id"] in before} == before
    assert all(s["split"] for s in after)
    assert _patients_in_one_split(after)
