"""Import a MedMNIST 3D ``.npz`` (28^3 or 64^3) into the catalog, keeping the official splits.

Each volume becomes ``WS/volumes/<scan_id>.nii.gz`` (1 mm isotropic, identity orientation) and
one catalog row with its official split (train/val/test), class name and a patient key of its
own (MedMNIST publishes no patient ids; AdrenalMNIST3D's split is patient-level already).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from medml.catalog import Catalog
from medml.io import atomic_path
from medml.workspace import Workspace

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

# Label names and source modality of the six 3D sets, as in MedMNIST v3's INFO table
# (medmnist/info.py). Copied here because the `medmnist` package pulls in torchvision and
# downloads data; we only need these names.
INFO: dict[str, tuple[str, tuple[str, ...]]] = {
    "organmnist3d": (
        "CT",
        (
            "liver", "kidney-right", "kidney-left", "femur-right", "femur-left", "bladder",
            "heart", "lung-right", "lung-left", "spleen", "pancreas",
        ),
    ),
    "nodulemnist3d": ("CT", ("benign", "malignant")),
    "adrenalmnist3d": ("CT", ("normal", "hyperplasia")),
    "fracturemnist3d": (
        "CT", ("buckle rib fracture", "nondisplaced rib fracture", "displaced rib fracture"),
    ),
    "vesselmnist3d": ("MR", ("vessel", "aneurysm")),  # from MR angiography
    "synapsemnist3d": ("EM", ("inhibitory synapse", "excitatory synapse")),  # electron microscopy
}  # fmt: skip


class MedMNISTError(ValueError):
    """An .npz that is not a usable MedMNIST 3D file; the message names the file and why."""


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_medmnist` put in the catalog."""

    dataset: str
    size: int
    classes: tuple[str, ...]
    counts: dict[str, int]  # split -> volumes
    written: int  # volumes (re)written; 0 on an unchanged re-run


def dataset_name(npz: Path) -> str:
    """``adrenalmnist3d_64.npz`` -> ``adrenalmnist3d``."""
    return re.sub(r"_(28|64)$", "", Path(npz).stem.lower())


def import_medmnist(
    npz: str | Path,
    ws: Workspace,
    dataset: str | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> ImportResult:
    """Import every volume of a MedMNIST 3D ``.npz`` (or the first ``limit`` of each split).

    Scan ids are ``<set><size>-<split>-<index>`` so a re-run replaces the same rows and only
    rewrites volumes whose content changed.
    """
    npz = Path(npz)
    name = dataset or dataset_name(npz)
    if name not in INFO:
        raise MedMNISTError(
            f"{npz}: unknown MedMNIST 3D set '{name}' (known: {', '.join(INFO)}); "
            "name the file after its set or pass --dataset"
        )
    modality, classes = INFO[name]
    try:
        data = np.load(npz)
        arrays = {s: (data[f"{s}_images"], data[f"{s}_labels"]) for s in SPLITS}
    except (OSError, ValueError, KeyError) as exc:
        raise MedMNISTError(f"{npz}: not a MedMNIST .npz ({type(exc).__name__}: {exc})") from exc
    size = _check(npz, arrays, len(classes))

    ws = ws.ensure()
    catalog = Catalog(ws.catalog_url)
    short = name.replace("mnist3d", "")
    counts, written = {}, 0
    for split in SPLITS:
        images, labels = arrays[split]
        n = len(images) if limit is None else min(limit, len(images))
        counts[split] = n
        for i in tqdm(range(n), desc=f"{name} {split}", unit="vol", disable=not progress):
            scan_id = f"{short}{size}-{split}-{i:05d}"
            written += _store(catalog, ws, scan_id, images[i], classes[int(labels[i][0])], split,
                              modality, name)  # fmt: skip
    log.info("imported %s (%d^3): %s, %d volumes written", name, size, counts, written)
    return ImportResult(name, size, classes, counts, written)


def _check(npz: Path, arrays: dict, n_classes: int) -> int:
    """The cube size, after checking shapes and label ranges."""
    sizes = set()
    for split, (images, labels) in arrays.items():
        if images.ndim != 4 or len(set(images.shape[1:])) != 1 or images.shape[1] not in (28, 64):
            raise MedMNISTError(
                f"{npz}: {split}_images has shape {images.shape}, expected (N, 28|64, 28|64, 28|64)"
            )
        if labels.shape != (len(images), 1):
            raise MedMNISTError(f"{npz}: {split}_labels has shape {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
            raise MedMNISTError(f"{npz}: {split}_labels outside 0..{n_classes - 1}")
        sizes.add(images.shape[1])
    if len(sizes) != 1:
        raise MedMNISTError(f"{npz}: splits differ in size: {sorted(sizes)}")
    return sizes.pop()


def _store(
    catalog: Catalog,
    ws: Workspace,
    scan_id: str,
    volume: np.ndarray,
    label: str,
    split: str,
    modality: str,
    name: str,
) -> int:
    """Write one volume (unless unchanged) and its catalog row; 1 if the file was written."""
    img = nib.Nifti1Image(np.ascontiguousarray(volume), np.eye(4))  # 1 mm isotropic
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    content_hash = hashlib.sha256(volume.tobytes() + np.eye(4).tobytes()).hexdigest()
    path = ws.volume_path(scan_id)
    existing = catalog.get_scan(scan_id)
    wrote = 0
    if not (existing and existing["content_hash"] == content_hash and path.exists()):
        with atomic_path(path, suffix=".nii.gz") as tmp:
            nib.save(img, tmp)
        wrote = 1
    catalog.upsert_scan(
        {
            "scan_id": scan_id,
            "patient_key": scan_id,  # one volume per patient key: no patient ids published
            "study_key": scan_id,
            "modality": modality,
            "shape": ",".join(map(str, volume.shape)),
            "spacing": "1.0000,1.0000,1.0000",
            "orientation": "RAS",
            "source_format": "medmnist",
            "content_hash": content_hash,
            "label": label,
            "class_set": "base",
            "split": split,
            "volume": path.relative_to(ws.root).as_posix(),
            "ingest_run": f"medmnist-{name}"[:32],
        }
    )
    return wrote
