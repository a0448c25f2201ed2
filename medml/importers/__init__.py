"""Dataset importers: published datasets (not raw exports) straight into the catalog.

An importer is one function that yields :class:`ImportedScan` items (voxels, affine, label,
official split); :func:`store` writes each volume (unless unchanged) and its catalog row, the
same for every importer. To add one: a module with that function and one
``IMPORTERS.register`` line.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from medml.extensions import Registry
from medml.workspace import Workspace


@dataclass
class ImportedScan:
    """One volume of a published dataset and what the catalog records of it."""

    scan_id: str
    data: np.ndarray  # (X, Y, Z) in RAS voxel order
    affine: np.ndarray  # 4x4 voxel -> RAS mm
    label: str | None
    split: str | None  # the dataset's official split, kept
    modality: str
    source_format: str
    patient_key: str | None = None  # default: the scan id (no patient ids published)
    class_set: str = "base"


@dataclass(frozen=True)
class ImporterSpec:
    target: str  # dotted path of the function yielding ImportedScan items
    doc: str = ""


IMPORTERS: Registry[ImporterSpec] = Registry("importer")
IMPORTERS.register(
    "medmnist",
    ImporterSpec("medml.importers.medmnist.medmnist_scans", "MedMNIST 3D .npz, official splits"),
)


def content_hash(data: np.ndarray, affine: np.ndarray) -> str:
    """Hash of the voxels and geometry: equal exactly when the volume is."""
    return hashlib.sha256(np.ascontiguousarray(data).tobytes() + affine.tobytes()).hexdigest()


def store(ws: Workspace, scans: Iterable[ImportedScan], run: str) -> int:
    """Write every scan's NIfTI (atomically, unless unchanged) and catalog row; the count
    of volumes written."""
    import nibabel as nib

    from medml.catalog import Catalog
    from medml.io import atomic_path

    catalog = Catalog(ws.ensure().catalog_url)
    written, rows = 0, []
    for scan in scans:
        digest = content_hash(scan.data, scan.affine)
        path = ws.volume_path(scan.scan_id)
        existing = catalog.get_scan(scan.scan_id)
        if not (existing and existing["content_hash"] == digest and path.exists()):
            img = nib.Nifti1Image(np.ascontiguousarray(scan.data), scan.affine)
            img.set_qform(scan.affine, code=1)
            img.set_sform(scan.affine, code=1)
            with atomic_path(path, suffix=".nii.gz") as tmp:
                nib.save(img, tmp)
            written += 1
        zooms = np.sqrt((scan.affine[:3, :3] ** 2).sum(axis=0))
        rows.append(
            {
                "scan_id": scan.scan_id,
                "patient_key": scan.patient_key or scan.scan_id,
                "study_key": scan.scan_id,
                "modality": scan.modality,
                "shape": ",".join(map(str, scan.data.shape)),
                "spacing": ",".join(f"{z:.4f}" for z in zooms),
                "orientation": "RAS",
                "source_format": scan.source_format,
                "content_hash": digest,
                "label": scan.label,
                "class_set": scan.class_set,
                "split": scan.split,
                "volume": path.relative_to(ws.root).as_posix(),
                "ingest_run": run[:32],
            }
        )
        if len(rows) >= 256:  # one transaction per batch of rows
            catalog.upsert_scans(rows)
            rows = []
    catalog.upsert_scans(rows)
    return written
