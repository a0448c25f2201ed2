"""Import a MedMNIST 3D ``.npz`` (28^3 or 64^3) into the catalog, keeping the official splits.

Each volume becomes ``WS/volumes/<scan_id>.nii.gz`` (1 mm isotropic, identity orientation) and
one catalog row with its official split (train/val/test), class name and a patient key of its
own (MedMNIST publishes no patient ids; AdrenalMNIST3D's split is patient-level already).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medml.importers import ImportedScan, store
from medml.lock import writes_workspace
from medml.progress import track
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


@writes_workspace("import-medmnist")
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
    name, size, arrays = _load(Path(npz), dataset)
    classes = INFO[name][1]
    counts = {
        split: len(arrays[split][0]) if limit is None else min(limit, len(arrays[split][0]))
        for split in SPLITS
    }
    scans = _scans(arrays, name, size, counts, progress)
    written = store(ws, scans, f"medmnist-{name}")
    log.info("imported %s (%d^3): %s, %d volumes written", name, size, counts, written)
    return ImportResult(name, size, classes, counts, written)


def medmnist_scans(npz: str | Path, dataset: str | None = None) -> Iterator[ImportedScan]:
    """The importer (registered as ``medmnist``): every volume of a MedMNIST 3D ``.npz``."""
    name, size, arrays = _load(Path(npz), dataset)
    yield from _scans(arrays, name, size, {s: len(arrays[s][0]) for s in SPLITS})


def _scans(
    arrays: dict, name: str, size: int, counts: dict[str, int], progress: bool = False
) -> Iterator[ImportedScan]:
    """Each volume of each split as an :class:`ImportedScan` (1 mm isotropic, identity
    orientation). Scan ids are ``<set><size>-<split>-<index>``, so a re-run replaces the same
    rows and rewrites only volumes whose content changed."""
    modality, classes = INFO[name]
    short = name.replace("mnist3d", "")
    for split in SPLITS:
        images, labels = arrays[split]
        for i in track(range(counts[split]), f"{name} {split}", enabled=progress, unit="vol"):
            yield ImportedScan(
                scan_id=f"{short}{size}-{split}-{i:05d}",
                data=images[i],
                affine=np.eye(4),
                label=classes[int(labels[i][0])],
                split=split,
                modality=modality,
                source_format="medmnist",
            )


def _load(npz: Path, dataset: str | None) -> tuple[str, int, dict]:
    """The set's name, cube size and ``split -> (images, labels)``, after checking them."""
    name = dataset or dataset_name(npz)
    if name not in INFO:
        raise MedMNISTError(
            f"{npz}: unknown MedMNIST 3D set '{name}' (known: {', '.join(INFO)}); "
            "name the file after its set or pass --dataset"
        )
    try:
        data = np.load(npz)
        arrays = {s: (data[f"{s}_images"], data[f"{s}_labels"]) for s in SPLITS}
    except (OSError, ValueError, KeyError) as exc:
        raise MedMNISTError(f"{npz}: not a MedMNIST .npz ({type(exc).__name__}: {exc})") from exc
    return name, _check(npz, arrays, len(INFO[name][1])), arrays


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
