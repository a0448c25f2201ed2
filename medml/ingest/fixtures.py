"""Write DICOM series with chosen geometry, for tests and benchmarks of ingestion.

Covers what real exports vary: slice orientation (any IOP, oblique included), patient position,
slice order on disk, rescale slope/intercept (per slice if asked), signed or unsigned pixels,
transfer syntax (native, deflate, RLE, JPEG 2000), gantry tilt, enhanced multi-frame objects,
classic and enhanced 4D series as vendors write them, and Siemens mosaics with a CSA header.
Nothing here is used by ingestion itself.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

# Image orientation (row direction, column direction) in LPS as scanners write it.
ORIENTATIONS: dict[str, tuple[float, ...]] = {
    "axial_HFS": (1, 0, 0, 0, 1, 0),
    "axial_HFP": (-1, 0, 0, 0, -1, 0),
    "axial_FFS": (-1, 0, 0, 0, 1, 0),
    "axial_FFP": (1, 0, 0, 0, -1, 0),
    "axial_HFDL": (0, 1, 0, -1, 0, 0),
    "axial_HFDR": (0, -1, 0, 1, 0, 0),
    "coronal": (1, 0, 0, 0, 0, -1),
    "sagittal": (0, 1, 0, 0, 0, -1),
}


def oblique(deg_x: float, deg_z: float) -> tuple[float, ...]:
    """Axial orientation rotated about the patient's x then z axis."""
    ax, az = np.radians([deg_x, deg_z])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    rot = rz @ rx
    return tuple(np.concatenate([rot @ [1, 0, 0], rot @ [0, 1, 0]]).round(8))


@dataclass
class SeriesSpec:
    """One series to write; ``stored`` is ``[slice, row, col]`` stored pixel values."""

    stored: np.ndarray
    iop: Sequence[float] = ORIENTATIONS["axial_HFS"]
    origin: Sequence[float] = (-100.0, -80.0, 40.0)
    pixel_spacing: tuple[float, float] = (0.8, 0.7)  # (row spacing, column spacing)
    slice_step: float = 2.5  # along the slice normal; negative walks the other way
    tilt_mm_per_slice: float = 0.0  # in-plane shift along the column direction (gantry tilt)
    descending: bool = False  # instance numbers run against the normal
    slope: float | Sequence[float] = 1.0
    intercept: float | Sequence[float] = -1024.0
    signed: bool = False
    patient_position: str = "HFS"
    transfer_syntax: str = ExplicitVRLittleEndian
    modality: str = "CT"
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL")
    series_uid: str = field(default_factory=generate_uid)
    study_uid: str = field(default_factory=generate_uid)
    identity: dict[str, str] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)
    file_prefix: str = "IM"

    def positions(self) -> np.ndarray:
        iop = np.asarray(self.iop, float)
        normal = np.cross(iop[:3], iop[3:])
        k = np.arange(len(self.stored))[:, None]
        return (
            np.asarray(self.origin, float)
            + k * self.slice_step * normal
            + k * self.tilt_mm_per_slice * iop[3:]
        )

    def lps_affine(self) -> np.ndarray:
        """Voxel (col, row, slice) to LPS mm: the ground truth a converter must reproduce."""
        iop = np.asarray(self.iop, float)
        pos = self.positions()
        aff = np.eye(4)
        aff[:3, 0] = iop[:3] * self.pixel_spacing[1]
        aff[:3, 1] = iop[3:] * self.pixel_spacing[0]
        aff[:3, 2] = pos[1] - pos[0] if len(pos) > 1 else np.cross(iop[:3], iop[3:])
        aff[:3, 3] = pos[0]
        return aff


def _per_slice(value: float | Sequence[float], k: int) -> float:
    return float(value[k]) if isinstance(value, Sequence) else float(value)


def base_header(spec: SeriesSpec, sop_class: str = CTImageStorage) -> Dataset:
    """Patient/study/series attributes shared by every slice."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.TransferSyntaxUID = spec.transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[spec.study_uid, "for"])
    ds.Modality = spec.modality
    ds.ImageType = list(spec.image_type)
    ds.PatientName = "Test^Patient"
    ds.PatientID = "TEST-0001"
    ds.StudyDate = "20200115"
    ds.SeriesNumber = 3
    ds.Manufacturer = "medml-fixtures"
    ds.PatientPosition = spec.patient_position
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if spec.signed else 0
    ds.Rows, ds.Columns = spec.stored.shape[1:]
    ds.PixelSpacing = [f"{v:.6g}" for v in spec.pixel_spacing]
    ds.SliceThickness = f"{abs(spec.slice_step):.6g}"
    ds.ImageOrientationPatient = [f"{v:.8g}" for v in spec.iop]
    for key, value in spec.identity.items():
        setattr(ds, key, value)
    for key, value in spec.extra.items():
        setattr(ds, key, value)
    return ds


def _set_pixels(ds: Dataset, plane: np.ndarray, syntax: str) -> None:
    ds.PixelData = plane.tobytes()
    ds["PixelData"].VR = "OW"
    if syntax in (RLELossless, JPEG2000Lossless):
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.compress(syntax)  # pydicom's RLE encoder / pylibjpeg-openjpeg


def write_series(spec: SeriesSpec, folder: Path) -> list[Path]:
    """Write one file per slice; returns the paths in the order written."""
    folder.mkdir(parents=True, exist_ok=True)
    dtype = np.int16 if spec.signed else np.uint16
    stored = spec.stored.astype(dtype)
    ds = base_header(spec)
    positions = spec.positions()
    n = len(stored)
    paths = []
    for k in range(n):
        ds.file_meta.TransferSyntaxUID = spec.transfer_syntax
        sop = generate_uid(entropy_srcs=[spec.series_uid, str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SOPInstanceUID = sop
        number = n - k if spec.descending else k + 1
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
        ds.RescaleSlope = f"{_per_slice(spec.slope, k):.6g}"
        ds.RescaleIntercept = f"{_per_slice(spec.intercept, k):.6g}"
        _set_pixels(ds, stored[k], spec.transfer_syntax)
        path = folder / f"{spec.file_prefix}{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_enhanced(spec: SeriesSpec, path: Path) -> Path:
    """Write the series as one enhanced (multi-frame) CT object with per-frame geometry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.int16 if spec.signed else np.uint16
    stored = spec.stored.astype(dtype)
    ds = base_header(spec, EnhancedCTImageStorage)
    for key in ("PixelSpacing", "SliceThickness", "ImageOrientationPatient"):
        delattr(ds, key)
    sop = generate_uid(entropy_srcs=[spec.series_uid, "mf"])
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPInstanceUID = sop
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(stored)
    ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime = "20200115", "120000", "20200115120000"
    measures = Dataset()
    measures.PixelSpacing = [f"{v:.6g}" for v in spec.pixel_spacing]
    measures.SliceThickness = f"{abs(spec.slice_step):.6g}"
    orient = Dataset()
    orient.ImageOrientationPatient = [f"{v:.8g}" for v in spec.iop]
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([orient])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    dim = Dataset()
    dim.DimensionIndexPointer = 0x00209057  # InStackPositionNumber
    dim.FunctionalGroupPointer = 0x00209111  # FrameContentSequence
    ds.DimensionIndexSequence = DicomSequence([dim])
    frames = []
    order = range(len(stored) - 1, -1, -1) if spec.descending else range(len(stored))
    positions = spec.positions()
    for i, k in enumerate(order):
        item = Dataset()
        plane = Dataset()
        plane.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
        item.PlanePositionSequence = DicomSequence([plane])
        content = Dataset()
        content.InStackPositionNumber = i + 1
        content.DimensionIndexValues = [i + 1]
        content.StackID = "1"
        item.FrameContentSequence = DicomSequence([content])
        rescale = Dataset()
        rescale.RescaleSlope = f"{_per_slice(spec.slope, k):.6g}"
        rescale.RescaleIntercept = f"{_per_slice(spec.intercept, k):.6g}"
        rescale.RescaleType = "HU"
        item.PixelValueTransformationSequence = DicomSequence([rescale])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    pixels = np.stack([stored[k] for k in order])
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_deflated(spec: SeriesSpec, folder: Path) -> list[Path]:
    """A series in the deflated explicit little endian transfer syntax."""
    spec.transfer_syntax = DeflatedExplicitVRLittleEndian
    return write_series(spec, folder)


def phantom(n_slices: int, rows: int, cols: int, seed: int = 0, signed: bool = False) -> np.ndarray:
    """Stored values with structure in every axis (so flips and transposes show)."""
    rng = np.random.default_rng(seed)
    k, r, c = np.meshgrid(np.arange(n_slices), np.arange(rows), np.arange(cols), indexing="ij")
    base = 1000 + 7 * k + 3 * r + c + rng.integers(0, 50, size=(n_slices, rows, cols))
    return (base - 1500) if signed else base


# ----------------------------------------------------------------------------- 4D and mosaics

# Attribute values per volume: a DICOM keyword -> value, or a private (group, element) tag ->
# (VR, value); private creators are written for the groups used (PRIVATE_CREATORS).
VolumeAttrs = dict[object, object]
PRIVATE_CREATORS = {  # (group, block) -> creator
    (0x2001, 0x10): "Philips Imaging DD 001",
    (0x2005, 0x10): "Philips MR Imaging DD 001",
    (0x2005, 0x14): "Philips MR Imaging DD 005",
    (0x0019, 0x10): "SIEMENS MR HEADER",
    (0x0029, 0x10): "SIEMENS CSA HEADER",
    (0x0043, 0x10): "GEMS_PARM_01",
}


def _set_attrs(ds: Dataset, attrs: VolumeAttrs) -> None:
    for key, value in attrs.items():
        if isinstance(key, tuple):
            group, element = key
            block = element >> 8
            ds.add_new((group, block), "LO", PRIVATE_CREATORS[(group, block)])
            vr, val = value  # type: ignore[misc]
            ds.add_new((group, element), vr, val)
        else:
            setattr(ds, str(key), value)


def volume_data(spec: SeriesSpec, v: int) -> np.ndarray:
    """Stored values of volume ``v`` of a 4D fixture: each volume differs from the others."""
    return spec.stored.astype(np.int64) + 37 * v


def write_classic_4d(
    spec: SeriesSpec,
    folder: Path,
    volumes: Sequence[VolumeAttrs],
    slice_major: bool = False,
    skip: Sequence[tuple[int, int]] = (),
) -> list[Path]:
    """A classic 4D series: one file per slice, the same positions once per volume.

    ``volumes[v]`` holds the attributes that mark volume ``v`` (a vendor's keys, or nothing
    for exports told apart by instance order alone). Instance numbers run volume by volume, or
    slice by slice with ``slice_major`` (Philips). ``skip`` lists (volume, slice) not written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    dtype = np.int16 if spec.signed else np.uint16
    positions = spec.positions()
    n_slices = len(spec.stored)
    paths = []
    for v, attrs in enumerate(volumes):
        stored = volume_data(spec, v).astype(dtype)
        for k in range(n_slices):
            if (v, k) in skip:
                continue
            ds = base_header(spec, MRImageStorage if spec.modality == "MR" else CTImageStorage)
            _set_attrs(ds, attrs)
            sop = generate_uid(entropy_srcs=[spec.series_uid, str(v), str(k)])
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.SOPInstanceUID = sop
            number = k * len(volumes) + v + 1 if slice_major else v * n_slices + k + 1
            ds.InstanceNumber = number
            ds.ImagePositionPatient = [f"{x:.6f}" for x in positions[k]]
            ds.RescaleSlope = f"{_per_slice(spec.slope, k):.6g}"
            ds.RescaleIntercept = f"{_per_slice(spec.intercept, k):.6g}"
            _set_pixels(ds, stored[k], spec.transfer_syntax)
            path = folder / f"{spec.file_prefix}{number:05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


def write_enhanced_4d(
    spec: SeriesSpec, path: Path, n_volumes: int, dimension_index: bool = True
) -> Path:
    """One enhanced MR object holding ``n_volumes`` stacks of the same positions.

    With ``dimension_index`` the DimensionIndexSequence is (StackID, InStackPositionNumber,
    TemporalPositionIndex) as Siemens XA and Philips write it; without, the frames carry no
    index that tells the stacks apart.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.int16 if spec.signed else np.uint16
    ds = base_header(spec, EnhancedMRImageStorage)
    for key in ("PixelSpacing", "SliceThickness", "ImageOrientationPatient"):
        delattr(ds, key)
    sop = generate_uid(entropy_srcs=[spec.series_uid, "mf4d"])
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPInstanceUID = sop
    ds.InstanceNumber = 1
    n_slices = len(spec.stored)
    ds.NumberOfFrames = n_slices * n_volumes
    ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime = "20200115", "120000", "20200115120000"
    measures = Dataset()
    measures.PixelSpacing = [f"{v:.6g}" for v in spec.pixel_spacing]
    measures.SliceThickness = f"{abs(spec.slice_step):.6g}"
    measures.SpacingBetweenSlices = f"{abs(spec.slice_step):.6g}"
    orient = Dataset()
    orient.ImageOrientationPatient = [f"{v:.8g}" for v in spec.iop]
    rescale = Dataset()
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = "1", "0", "US"
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([orient])
    shared.PixelValueTransformationSequence = DicomSequence([rescale])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    if dimension_index:
        dims = []
        for pointer in (0x00209056, 0x00209057, 0x00209128):
            dim = Dataset()
            dim.DimensionIndexPointer = pointer
            dim.FunctionalGroupPointer = 0x00209111  # FrameContentSequence
            dims.append(dim)
        ds.DimensionIndexSequence = DicomSequence(dims)
    frames, pixels = [], []
    positions = spec.positions()
    for v in range(n_volumes):
        stored = volume_data(spec, v).astype(dtype)
        for k in range(n_slices):
            item = Dataset()
            plane = Dataset()
            plane.ImagePositionPatient = [f"{x:.6f}" for x in positions[k]]
            item.PlanePositionSequence = DicomSequence([plane])
            if dimension_index:
                content = Dataset()
                content.StackID = "1"
                content.InStackPositionNumber = k + 1
                content.TemporalPositionIndex = v + 1
                content.DimensionIndexValues = [1, k + 1, v + 1]
                item.FrameContentSequence = DicomSequence([content])
            frames.append(item)
            pixels.append(stored[k])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.PixelData = np.stack(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def csa2_header(tags: dict[str, tuple[str, Sequence[str]]]) -> bytes:
    """A Siemens CSA2 ("SV10") header holding ``name -> (VR, values)``.

    Written by hand: no library writes CSA. The layout is what nibabel.nicom.csareader reads:
    a tag is a 64-byte name, VM, VR, syngo type, item count, 77; an item is four int32 (the
    second its length) and the NUL-terminated text padded to 4 bytes.
    """
    out = b"SV10\x04\x03\x02\x01" + struct.pack("<2I", len(tags), 77)
    for name, (vr, values) in tags.items():
        out += struct.pack("<64si4s3i", name.encode(), len(values), vr.encode(), 0, len(values), 77)
        for value in values:
            text = str(value).encode() + b"\x00"
            out += struct.pack("<4i", len(text), len(text), 77, len(text))
            out += text + b"\x00" * (-len(text) % 4)
    return out


def write_mosaic(spec: SeriesSpec, folder: Path, n_volumes: int = 1) -> list[Path]:
    """A Siemens mosaic time series: each file one volume, its slices tiled in a square grid.

    ``spec`` describes one volume's slices as usual (positions, step along the normal, which
    may be negative: the CSA SliceNormalVector then points against row x column).
    """
    folder.mkdir(parents=True, exist_ok=True)
    n_tiles, rows, cols = spec.stored.shape
    grid = int(np.ceil(np.sqrt(n_tiles)))
    iop = np.asarray(spec.iop, float)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir) * np.sign(spec.slice_step)
    first = spec.positions()[0]
    row_spacing, col_spacing = spec.pixel_spacing
    corner = (
        first
        - col_dir * row_spacing * (grid * rows - rows) / 2
        - row_dir * col_spacing * (grid * cols - cols) / 2
    )
    csa = csa2_header(
        {"NumberOfImagesInMosaic": ("IS", [str(n_tiles)]),
         "SliceNormalVector": ("FD", [f"{v:.8f}" for v in normal])}
    )  # fmt: skip
    paths = []
    for v in range(n_volumes):
        stored = volume_data(spec, v).astype(np.uint16)
        plane = np.zeros((grid * rows, grid * cols), np.uint16)
        for k in range(n_tiles):
            r, c = divmod(k, grid)
            plane[r * rows : (r + 1) * rows, c * cols : (c + 1) * cols] = stored[k]
        ds = base_header(replace(spec, stored=plane[None]), MRImageStorage)
        ds.Manufacturer = "SIEMENS"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
        ds.SpacingBetweenSlices = f"{abs(spec.slice_step):.6g}"
        ds.AcquisitionNumber = v + 1
        ds.InstanceNumber = v + 1
        ds.ImagePositionPatient = [f"{x:.6f}" for x in corner]
        ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
        _set_attrs(ds, {(0x0029, 0x1010): ("OB", csa)})
        sop = generate_uid(entropy_srcs=[spec.series_uid, "mosaic", str(v)])
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SOPInstanceUID = sop
        _set_pixels(ds, plane, spec.transfer_syntax)
        path = folder / f"{spec.file_prefix}{v + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
