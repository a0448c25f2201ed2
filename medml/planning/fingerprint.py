"""The dataset fingerprint: what the catalog's scans look like, before any plan is made.

As nnU-Net v2's ``DatasetFingerprintExtractor``: spacings and shapes of every scan, intensities
of the foreground of a bounded, seeded sample of volumes, plus what a metric-learning project
needs besides (modality per scan, class counts per split, whether the volumes are binary masks).
Spacings and shapes come from the catalog (written by ingestion from the canonical RAS volume),
so only the sampled volumes are read.
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from pydantic import BaseModel, ConfigDict
from scipy import ndimage

from medml.catalog import Catalog
from medml.config import PlanConfig
from medml.workspace import Workspace

log = logging.getLogger(__name__)

EMPTY_CATALOG = "the catalog is empty: run `medml ingest` (or `medml pipeline`) first"
UNSPLIT = "unassigned"  # the split key of labelled scans no split was assigned to yet
PERCENTILES = (0.5, 50.0, 99.5)


class PlanningError(ValueError):
    """The catalog cannot be planned for (empty, unreadable plans file, ...)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AxisStats(_Frozen):
    """Per-axis statistics over scans (RAS axis order)."""

    median: tuple[float, float, float]
    p10: tuple[float, float, float]
    p90: tuple[float, float, float]
    min: tuple[float, float, float]
    max: tuple[float, float, float]

    @classmethod
    def of(cls, rows: np.ndarray) -> AxisStats:
        def axes(values: np.ndarray) -> tuple[float, float, float]:
            return tuple(round(float(v), 4) for v in values)  # type: ignore[return-value]

        return cls(
            median=axes(np.percentile(rows, 50, axis=0)),
            p10=axes(np.percentile(rows, 10, axis=0)),
            p90=axes(np.percentile(rows, 90, axis=0)),
            min=axes(rows.min(axis=0)),
            max=axes(rows.max(axis=0)),
        )


class IntensityStats(_Frozen):
    """Foreground intensities of one modality's sampled volumes, pooled."""

    volumes: int
    voxels: int
    p00_5: float
    p50: float
    p99_5: float
    mean: float
    std: float


class Fingerprint(_Frozen):
    """What ``make_plans`` decides from; written inside ``plans.json``."""

    n_scans: int
    catalog_digest: str
    modalities: dict[str, int]
    spacing: AxisStats
    shape: AxisStats
    extent_mm: AxisStats
    intensity: dict[str, IntensityStats]
    binary: dict[str, bool]
    class_counts: dict[str, dict[str, int]]
    sampled: int
    seed: int
    notes: tuple[str, ...] = ()


def catalog_digest(scans: Sequence[dict[str, Any]]) -> str:
    """Hash of what a plan depends on: each scan's id, voxels, geometry, modality and label
    (not its split: preprocessing draws splits after planning)."""
    fields = ("scan_id", "content_hash", "shape", "spacing", "modality", "label")
    rows = sorted("|".join(str(s.get(f)) for f in fields) for s in scans)
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def catalog_exists(ws: Workspace) -> bool:
    """False for a SQLite catalog whose file is not there (opening it would create it)."""
    url = ws.catalog_url
    return not url.startswith("sqlite:///") or Path(url.removeprefix("sqlite:///")).exists()


def foreground(volume: np.ndarray, modality: str, cfg: PlanConfig) -> np.ndarray:
    """Boolean mask of the voxels whose intensities the plans are made from.

    nnU-Net samples voxels under its segmentation labels; scans here carry none, so:
    - CT: the body, i.e. voxels above ``cfg.ct_body_hu`` with holes filled per axial slice, so
      lungs and airways inside the chest count while the air around the patient and the
      padding outside the field of view do not;
    - any other modality: voxels above the volume's minimum (MR's zero background).
    """
    if modality == "CT":
        body = volume > cfg.ct_body_hu
        # hand-written: no library call fills holes slice by slice (a 3-D fill would leave the
        # lungs open wherever the airway leaves the volume)
        return np.stack(
            [ndimage.binary_fill_holes(body[..., k]) for k in range(body.shape[-1])], axis=-1
        )
    return volume > volume.min()


def is_binary(volume: np.ndarray) -> bool:
    """A mask volume: every voxel 0/1 or every voxel 0/255 (MedMNIST's shape masks)."""
    lo, hi = volume.min(), volume.max()
    if lo != 0 or hi not in (0, 1, 255):
        return False
    return bool(np.isin(volume, (0, hi)).all())


def _triple(text: str | None, what: str, scan_id: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in str(text).split(",")], dtype=float)
    except ValueError as exc:
        raise PlanningError(f"scan {scan_id}: catalog {what} {text!r} is not numbers") from exc
    if values.shape != (3,) or not np.all(values > 0):
        raise PlanningError(f"scan {scan_id}: catalog {what} {text!r} is not three positives")
    return values


def _sample(
    ws: Workspace, scans: list[dict[str, Any]], cfg: PlanConfig
) -> tuple[dict[str, list[np.ndarray]], dict[str, bool], list[str], int]:
    """Read a seeded sample of volumes: foreground voxels and binariness per modality."""
    rng = np.random.default_rng(cfg.seed)
    picks = sorted(rng.choice(len(scans), size=min(cfg.sample_volumes, len(scans)), replace=False))
    voxels: dict[str, list[np.ndarray]] = {}
    binary: dict[str, bool] = {}
    notes: list[str] = []
    read = 0
    for i in picks:
        scan = scans[i]
        modality = scan.get("modality") or "unknown"
        path = ws.root / scan["volume"]
        try:
            volume = np.asarray(nib.load(path).dataobj)
        except (OSError, EOFError, ValueError, zlib.error, ImageFileError) as exc:
            notes.append(f"{scan['volume']}: not read ({type(exc).__name__}: {exc})")
            log.warning("planning skips %s: %s", path, exc)
            continue
        read += 1
        binary[modality] = binary.get(modality, True) and is_binary(volume)
        values = volume[foreground(volume, modality, cfg)].astype(np.float64)
        if values.size > cfg.voxels_per_volume:
            values = rng.choice(values, size=cfg.voxels_per_volume, replace=False)
        voxels.setdefault(modality, []).append(values)
    return voxels, binary, notes, read


def _intensity(chunks: list[np.ndarray]) -> IntensityStats | None:
    values = np.concatenate(chunks) if chunks else np.empty(0)
    if values.size == 0:
        return None
    p_lo, p_mid, p_hi = np.percentile(values, PERCENTILES)
    return IntensityStats(
        volumes=len(chunks),
        voxels=int(values.size),
        p00_5=round(float(p_lo), 4),
        p50=round(float(p_mid), 4),
        p99_5=round(float(p_hi), 4),
        mean=round(float(values.mean()), 4),
        std=round(float(values.std()), 4),
    )


def class_counts(scans: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Labelled scans per split and class (``unassigned`` before splits are drawn)."""
    counts: dict[str, Counter[str]] = {}
    for s in scans:
        if s.get("label") is not None:
            counts.setdefault(s.get("split") or UNSPLIT, Counter())[s["label"]] += 1
    return {split: dict(sorted(c.items())) for split, c in sorted(counts.items())}


def fingerprint(ws: Workspace, catalog: Catalog, cfg: PlanConfig | None = None) -> Fingerprint:
    """Fingerprint every scan of ``catalog`` (labelled or not) in workspace ``ws``."""
    cfg = cfg or PlanConfig()
    scans = catalog.list_scans(labelled=False)
    if not scans:
        raise PlanningError(EMPTY_CATALOG)
    spacing = np.stack([_triple(s["spacing"], "spacing", s["scan_id"]) for s in scans])
    shape = np.stack([_triple(s["shape"], "shape", s["scan_id"]) for s in scans])
    voxels, binary, notes, read = _sample(ws, scans, cfg)
    if read == 0:
        raise PlanningError(f"none of the {len(scans)} sampled volumes could be read: {notes[:3]}")
    intensity = {m: stats for m, chunks in voxels.items() if (stats := _intensity(chunks))}
    return Fingerprint(
        n_scans=len(scans),
        catalog_digest=catalog_digest(scans),
        modalities=dict(sorted(Counter(s.get("modality") or "unknown" for s in scans).items())),
        spacing=AxisStats.of(spacing),
        shape=AxisStats.of(shape),
        extent_mm=AxisStats.of(shape * spacing),
        intensity=intensity,
        binary=binary,
        class_counts=class_counts(scans),
        sampled=read,
        seed=cfg.seed,
        notes=tuple(notes),
    )
