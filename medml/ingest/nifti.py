"""NIfTI input: validate, reorient to canonical RAS, and write a fresh de-identified file."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medml.io import atomic_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_name(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


class NiftiError(ValueError):
    """An unusable NIfTI file; the message is the quarantine reason."""


def load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load and validate: 3D (or 4D with one volume), finite, usable affine, voxel sizes > 0."""
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise NiftiError(f"unreadable NIfTI: {type(exc).__name__}: {exc}") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise NiftiError(f"NIfTI is {data.ndim}D with shape {data.shape}; a 3D volume is required")
    if min(data.shape) < 2:
        raise NiftiError(f"NIfTI shape {data.shape} is a single slice, not a volume")
    if not np.all(np.isfinite(data)):
        raise NiftiError("NIfTI holds NaN or infinite voxel values")
    affine = img.affine
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if (
        not np.all(np.isfinite(affine))
        or abs(np.linalg.det(affine[:3, :3])) < 1e-6
        or np.any(zooms <= 0)
    ):
        raise NiftiError("NIfTI has no usable qform/sform (singular or non-finite affine)")
    return data, affine


def to_canonical(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """A new image in closest-canonical RAS orientation, with an empty header otherwise.

    Building a new header drops ``descrip``, ``aux_file``, ``intent_name`` and extensions, where
    exporters sometimes put patient names.
    """
    if (
        np.issubdtype(data.dtype, np.floating)
        and np.allclose(data, np.rint(data))
        and data.min() >= -32768
        and data.max() <= 32767
    ):
        data = np.rint(data).astype(np.int16)
    img = nib.Nifti1Image(np.asarray(data), affine)
    canon = nib.as_closest_canonical(img)
    out = nib.Nifti1Image(np.asarray(canon.dataobj), canon.affine)
    out.set_qform(canon.affine, code=1)
    out.set_sform(canon.affine, code=1)
    return out


def save_atomic(img: nib.Nifti1Image, path: Path) -> None:
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, tmp)
