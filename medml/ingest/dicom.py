"""DICOM series: index headers, group into series, stack slices with exact geometry.

Slices are sorted along the slice normal (ImagePositionPatient . normal), never by
InstanceNumber; RescaleSlope/Intercept are applied per slice; the affine maps voxel indices to
RAS millimetres.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Storage SOP classes that hold no image volume (SR, RTSTRUCT, SEG, PR, RT plans/doses, ...).
NON_IMAGE_MODALITIES = {
    "SR",
    "RTSTRUCT",
    "RTPLAN",
    "RTDOSE",
    "RTRECORD",
    "SEG",
    "PR",
    "KO",
    "ECG",
    "AU",
    "DOC",
    "REG",
    "PLAN",
}


class SeriesError(ValueError):
    """A series that cannot become a trustworthy volume; the message is the quarantine reason."""


@dataclass
class Slice:
    """Header facts of one image file, read without pixel data."""

    path: Path
    header: pydicom.Dataset

    @property
    def position(self) -> np.ndarray:
        return np.asarray(self.header.ImagePositionPatient, dtype=float)

    @property
    def orientation(self) -> np.ndarray:
        return np.asarray(self.header.ImageOrientationPatient, dtype=float)


@dataclass
class Series:
    """Slices sharing a SeriesInstanceUID, orientation and matrix size."""

    uid: str
    slices: list[Slice] = field(default_factory=list)

    @property
    def first(self) -> pydicom.Dataset:
        return self.slices[0].header


def read_header(path: Path) -> pydicom.Dataset:
    """Read a DICOM header; raises InvalidDicomError for files that are not DICOM."""
    return pydicom.dcmread(path, stop_before_pixels=True)


def is_dicom(path: Path) -> bool:
    try:
        read_header(path)
    except (InvalidDicomError, OSError):
        return False
    return True


def image_problem(ds: pydicom.Dataset) -> str | None:
    """Why this DICOM object is not a slice of an image volume, or None if it is."""
    modality = str(ds.get("Modality", ""))
    if modality in NON_IMAGE_MODALITIES:
        return f"non-image DICOM object (Modality {modality})"
    missing = [
        t
        for t in (
            "SeriesInstanceUID",
            "Rows",
            "Columns",
            "ImagePositionPatient",
            "ImageOrientationPatient",
            "PixelSpacing",
        )
        if t not in ds
    ]
    if missing:
        return f"DICOM without image geometry or pixel data (missing {', '.join(missing)})"
    return None


def group_series(slices: list[Slice]) -> list[Series]:
    """Group by SeriesInstanceUID, split further by orientation and matrix size."""
    groups: dict[tuple, Series] = {}
    by_uid: dict[str, int] = defaultdict(int)
    for s in slices:
        h = s.header
        key = (
            str(h.SeriesInstanceUID),
            tuple(np.round(s.orientation, 4)),
            int(h.Rows),
            int(h.Columns),
        )
        if key not in groups:
            by_uid[key[0]] += 1
            suffix = "" if by_uid[key[0]] == 1 else f".{by_uid[key[0]]}"
            groups[key] = Series(uid=key[0] + suffix)
        groups[key].slices.append(s)
    return list(groups.values())


def slice_normal(orientation: np.ndarray) -> np.ndarray:
    return np.cross(orientation[:3], orientation[3:])


def sort_and_check(series: Series, min_slices: int) -> np.ndarray:
    """Sort slices along the normal in place; return the positions along it.

    Raises SeriesError for too few slices, duplicate positions, or a gap over 1.5x the median.
    """
    if len(series.slices) < min_slices:
        raise SeriesError(f"series has {len(series.slices)} slice(s), fewer than {min_slices}")
    normal = slice_normal(series.slices[0].orientation)
    series.slices.sort(key=lambda s: float(s.position @ normal))
    pos = np.array([float(s.position @ normal) for s in series.slices])
    gaps = np.diff(pos)
    if np.any(gaps < 1e-3):
        i = int(np.argmin(gaps))
        raise SeriesError(f"duplicate slice position {pos[i]:.2f} mm (slices {i} and {i + 1})")
    median = float(np.median(gaps))
    if np.any(gaps > 1.5 * median):
        i = int(np.argmax(gaps))
        raise SeriesError(
            f"missing slice: gap {gaps[i]:.1f} mm after slice {i} (median spacing {median:.1f} mm)"
        )
    return pos


def load_volume(series: Series) -> tuple[np.ndarray, np.ndarray]:
    """Stack the (sorted) slices into ``(col, row, slice)`` data in real units and a RAS affine."""
    planes = []
    for s in series.slices:
        ds = pydicom.dcmread(s.path)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        planes.append(ds.pixel_array.astype(np.float32) * slope + intercept)
    data = np.stack(planes, axis=-1).transpose(1, 0, 2)  # (row, col, k) -> (col, row, k)

    first = series.first
    iop = series.slices[0].orientation
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    step = (
        (series.slices[-1].position - series.slices[0].position) / (len(series.slices) - 1)
        if len(series.slices) > 1
        else slice_normal(iop) * float(first.get("SliceThickness", 1.0) or 1.0)
    )
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * col_spacing  # along a row: column index increases
    lps[:3, 1] = iop[3:] * row_spacing  # down a column: row index increases
    lps[:3, 2] = step
    lps[:3, 3] = series.slices[0].position
    return data, LPS_TO_RAS @ lps
