"""NIfTI input and output: validate, reorient to canonical RAS, write a fresh de-identified file."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from isal import isal_zlib

from medml.ingest import budget
from medml.io import atomic_path

if TYPE_CHECKING:
    import nibabel as nib

    Header = nib.Nifti1Header  # or a NIfTI-2 / Analyze header, from nibabel's loader

# nibabel is imported where a volume is read or written, not with this module: it costs 30 ms
# and, through nibabel.nifti1, pydicom's ~110 ms (with requests), which a command that never
# reads a volume (an empty ingest, --help) should not pay.

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NIFTI1_VOX_OFFSET = 352  # 348-byte header + 4-byte extension flag (no extensions)
NIFTI1_HEADER_BYTES = 348
SIZEOF_HDR = (348).to_bytes(4, "little")  # a little-endian NIfTI-1 header starts so


def is_nifti_name(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


class NiftiError(ValueError):
    """An unusable NIfTI file; the message is the quarantine reason."""


def _read(path: Path, max_voxels: int) -> tuple[Header, np.ndarray]:
    """The header and voxels, the claim checked first (:mod:`medml.ingest.budget`): nibabel
    reads only the header, the voxels it claims must fit the ceiling and be in the file
    (uncompressed) or inflate to exactly that size (gzip: inflated by ISA-L in chunks, 2-3x
    faster than nibabel's zlib reader, stopping one byte past the claim)."""
    import nibabel as nib

    if path.name.lower().endswith(".gz"):
        with path.open("rb") as fh:
            found = _read_gz_nifti1(budget.Inflater(fh, budget.GZIP_WBITS), max_voxels)
        if found is not None:
            return found
    img = nib.load(str(path))  # the header; voxels stay on disk
    offset = int(getattr(img.dataobj, "offset", img.header.get_data_offset()))  # header's is reset
    what, needed = _claim(img.header, offset, max_voxels)
    if not path.name.lower().endswith(".gz"):
        budget.check_held(what, needed, path.stat().st_size)
        return img.header, np.asanyarray(img.dataobj)
    with path.open("rb") as fh:
        blob = budget.Inflater(fh, budget.GZIP_WBITS).read_exactly(what, needed)
    img = type(img).from_bytes(blob)
    return img.header, np.asanyarray(img.dataobj)


def _claim(hdr: Header, offset: int, max_voxels: int) -> tuple[str, int]:
    """What the header claims, in words, and the bytes the file must hold for it (refused by
    :func:`budget.check_claim` over ``max_voxels``)."""
    shape, dtype = hdr.get_data_shape(), hdr.get_data_dtype()
    what = f"{' x '.join(map(str, shape))} {dtype.name}"
    return what, offset + budget.check_claim(what, shape, dtype.itemsize, max_voxels)


def _read_gz_nifti1(
    inflater: budget.Inflater, max_voxels: int
) -> tuple[nib.Nifti1Header, np.ndarray] | None:
    """A gzipped single-file NIfTI-1 (nearly every ``.nii.gz``), its header parsed from the
    first inflated bytes and its voxels viewed in place; ``None`` for any other kind, which
    nibabel's loader then sniffs (it would open the file again through Python's gzip module,
    build an image and copy the voxels twice: 0.5 ms of a 1.9 ms read of a demo scan)."""
    import nibabel as nib

    inflater.fill(NIFTI1_HEADER_BYTES)
    head = inflater.data()[:NIFTI1_HEADER_BYTES]
    if len(head) < NIFTI1_HEADER_BYTES or head[344:348] != b"n+1\x00" or head[:4] != SIZEOF_HDR:
        return None
    hdr = nib.Nifti1Header(head)
    offset = int(hdr.get_data_offset())
    if offset < NIFTI1_VOX_OFFSET:  # malformed: as nibabel's loader reads it
        return None
    what, needed = _claim(hdr, offset, max_voxels)
    blob = inflater.read_exactly(what, needed, writable=True)
    if hdr.get_slope_inter() not in ((None, None), (1.0, 0.0)):
        img = nib.Nifti1Image.from_bytes(blob)  # scaled values: nibabel applies them
        return img.header, np.asanyarray(img.dataobj)
    shape = hdr.get_data_shape()
    count = math.prod(shape)
    return hdr, np.frombuffer(blob, hdr.get_data_dtype(), count, offset).reshape(shape, order="F")


def load_nifti(path: Path, max_voxels: int = budget.MAX_VOXELS) -> tuple[np.ndarray, np.ndarray]:
    """Load and validate: 3D (or 4D with one volume), finite, usable affine, voxel sizes > 0.

    A header claiming more than ``max_voxels`` (``ingest.max_voxels``), or more than the file
    holds, is refused before its voxels are allocated.
    """
    try:
        hdr, data = _read(Path(path), max_voxels)
    except budget.BudgetError as exc:
        raise NiftiError(f"invalid NIfTI: {exc}") from exc
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise NiftiError(f"invalid NIfTI: unreadable: {type(exc).__name__}: {exc}") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise NiftiError(
            f"invalid NIfTI: {data.ndim}D with shape {data.shape}; a 3D volume is required"
        )
    if min(data.shape) < 2:
        raise NiftiError(f"invalid NIfTI: shape {data.shape} is a single slice, not a volume")
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise NiftiError("invalid NIfTI: holds NaN or infinite voxel values")
    qcode, scode = int(hdr["qform_code"]), int(hdr["sform_code"])
    affine = hdr.get_best_affine()
    zooms = np.asarray(hdr.get_zooms()[:3], float)
    if (
        not np.all(np.isfinite(affine))
        or abs(np.linalg.det(affine[:3, :3])) < 1e-6
        or np.any(zooms <= 0)
        or not np.all(np.isfinite(zooms))
    ):
        raise NiftiError(
            "invalid NIfTI: no usable qform/sform "
            "(singular or non-finite affine, or voxel size <= 0)"
        )
    if qcode == 0 and scode == 0:
        raise NiftiError("invalid NIfTI: qform_code and sform_code are both 0 (no orientation)")
    return data, affine


def _compact(data: np.ndarray) -> np.ndarray:
    """The smallest exact NIfTI type: int16 / uint16 when the values allow, else as given."""
    if data.size == 0 or data.dtype in (np.int16, np.uint16, np.uint8, np.int8):
        return data
    if np.issubdtype(data.dtype, np.floating) and not np.array_equal(data, np.rint(data)):
        return data.astype(np.float32, copy=False)
    lo, hi = data.min(), data.max()
    if lo >= -32768 and hi <= 32767:
        return data.astype(np.int16, copy=False)
    if lo >= 0 and hi <= 65535:
        return data.astype(np.uint16, copy=False)
    if np.issubdtype(data.dtype, np.floating):
        return data.astype(np.float32, copy=False)
    return data.astype(np.int32, copy=False)


def to_canonical(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """A new image in closest-canonical RAS orientation, with an empty header otherwise.

    Building a new header drops ``descrip``, ``aux_file``, ``intent_name`` and extensions, where
    exporters sometimes put patient names.
    """
    import nibabel as nib

    data = _compact(np.asarray(data))
    affine = np.array(affine, dtype=np.float64)
    # what nib.as_closest_canonical does, without building the two images it goes through
    ornt = nib.orientations.io_orientation(affine)
    if not np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        affine = affine.dot(nib.orientations.inv_ornt_aff(ornt, data.shape))
        data = nib.orientations.apply_orientation(data, ornt)
    out = nib.Nifti1Image(np.asfortranarray(data), affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    return out


def content_hash(img: nib.Nifti1Image) -> str:
    """Hash of voxels, dtype and geometry: equal exactly when the stored volume would be."""
    data = np.asarray(img.dataobj)
    h = hashlib.sha256(str((data.dtype.str, data.shape)).encode())
    h.update(np.round(img.affine, 4).tobytes())
    h.update(memoryview(np.asfortranarray(data).T).cast("B"))  # .T: C-contiguous, no copy
    return h.hexdigest()


def voxel_hash(data: np.ndarray, affine: np.ndarray) -> str:
    """Hash of the voxels as :func:`to_canonical` would store them (closest RAS orientation,
    compact type, Fortran order), geometry left out: a DICOM series and the NIfTI written for
    it hash alike. Slice by slice, so the volume is never reoriented as a whole."""
    import nibabel as nib

    data = _compact(np.asarray(data))
    view = nib.orientations.apply_orientation(data, nib.orientations.io_orientation(affine))
    h = hashlib.sha256(str((data.dtype.str, view.shape)).encode())
    for k in range(view.shape[2]):
        h.update(np.ascontiguousarray(view[:, :, k].T))  # one plane in Fortran order
    return h.hexdigest()


def nifti_header_bytes(img: nib.Nifti1Image) -> bytes:
    """The 352 bytes before the voxels of a single-file NIfTI-1 (no extensions)."""
    data = np.asarray(img.dataobj)
    hdr = img.header.copy()
    hdr.set_data_dtype(data.dtype)
    hdr.set_data_shape(data.shape)
    hdr.set_data_offset(NIFTI1_VOX_OFFSET)
    hdr["scl_slope"], hdr["scl_inter"] = np.nan, np.nan
    hdr["descrip"] = b""
    return hdr.binaryblock + b"\x00\x00\x00\x00"


def nifti_gz_bytes(img: nib.Nifti1Image, level: int = 1) -> bytes:
    """Deterministic gzip (mtime 0, no name) of a single-file NIfTI-1.

    Hand-assembled (nibabel's header, then the voxels in Fortran order, streamed through
    ISA-L) because nibabel's writer copies the array twice and compresses with Python's zlib,
    about 3x slower on a 512x512x100 CT.
    """
    data = np.asfortranarray(np.asarray(img.dataobj))
    comp = isal_zlib.compressobj(level, isal_zlib.DEFLATED, 31)  # 31: gzip wrapper, mtime 0
    parts = [comp.compress(nifti_header_bytes(img))]
    if data.size:
        parts.append(comp.compress(memoryview(data.T).cast("B")))  # .T: C-contiguous, no copy
    parts.append(comp.flush())
    return b"".join(parts)


def save_atomic(img: nib.Nifti1Image, path: Path, level: int = 1) -> None:
    """Write ``img`` as deterministic gzip (mtime 0, no name) to a temp file, then rename."""
    blob = nifti_gz_bytes(img, level)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        tmp.write_bytes(blob)
