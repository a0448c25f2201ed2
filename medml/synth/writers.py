"""Write rendered volumes as real DICOM series (pydicom) or NIfTI (nibabel).

Geometry follows the grid exactly, for any acquisition plane: ImageOrientationPatient is the
grid's row and column directions, ImagePositionPatient the LPS centre of each slice's first
voxel, and the NIfTI affine the same mapping in RAS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
)

from medml.io import atomic_path
from medml.synth.identity import Identity
from medml.synth.phantom import Grid

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class SeriesMeta:
    """What distinguishes one series' headers: modality, numbering, description, contrast."""

    modality: str = "CT"  # CT or MR
    series_number: int = 1
    description: str = ""
    body_part: str = "CHEST"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    weighting: str = ""  # MR: T1 or T2 (sets TR/TE)


def write_nifti(volume: np.ndarray, grid: Grid, path: Path, description: str = "") -> None:
    """Write ``[slice, row, col]`` data (HU or MR units) as NIfTI with its RAS affine.

    ``description`` lands in the header's ``descrip`` field, as some exporters do with names.
    """
    data = np.transpose(np.rint(volume).astype(np.int16), (2, 1, 0))  # -> (col, row, slice)
    img = nib.Nifti1Image(data, LPS_TO_RAS @ grid.lps_affine())
    img.header["descrip"] = description.encode()[:79]
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, tmp)


def stored_values(volume: np.ndarray, modality: str) -> np.ndarray:
    """Pixel values as stored: CT with intercept -1024 in 12 bits, MR as unsigned 16-bit units."""
    if modality == "CT":
        return np.rint(volume + 1024.0).clip(0, 4095).astype(np.uint16)
    return np.rint(volume).clip(0, 65535).astype(np.uint16)


def write_dicom_series(
    volume: np.ndarray,
    grid: Grid,
    folder: Path,
    identity: Identity,
    study_uid: str,
    series_uid: str,
    study_index: int,
    uid_seed: str,
    slice_thickness: float,
    meta: SeriesMeta | None = None,
    skip: tuple[int, ...] = (),
) -> list[Path]:
    """Write one series, one file per slice, with full geometry and identity tags.

    ``skip`` leaves out slices (a broken export); instance numbers keep counting through them.
    Returns the written paths.
    """
    meta = meta or SeriesMeta()
    stored = stored_values(volume, meta.modality)
    dy, dx = grid.spacing[1], grid.spacing[2]
    ds = image_header(identity, study_uid, series_uid, _uid(uid_seed, "frame"), study_index, meta)
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in grid.iop]
    ds.PixelSpacing = [f"{dy:.6f}", f"{dx:.6f}"]  # row spacing, column spacing
    ds.SliceThickness = f"{slice_thickness:.4f}"
    ds.SpacingBetweenSlices = f"{grid.spacing[0]:.4f}"
    ds.Rows, ds.Columns = grid.ny, grid.nx
    if meta.modality == "MR":
        ds.LargestImagePixelValue = int(stored.max())
        ds.WindowCenter = f"{float(np.percentile(stored, 99)) / 2:.0f}"
        ds.WindowWidth = f"{float(np.percentile(stored, 99)):.0f}"
    paths = []
    for k in range(grid.nz):  # one header, updated per slice: building it is the slow part
        if k in skip:
            continue
        sop_uid = _uid(uid_seed, "sop", str(k))
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        pos = grid.position(k)
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.SliceLocation = f"{float(pos @ grid.normal):.4f}"
        ds.PixelData = stored[k].tobytes()
        path = folder / f"IM{k + 1:04d}.dcm"
        with atomic_path(path, suffix=".dcm") as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        paths.append(path)
    return paths


def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=list(parts))


def patient_study_header(identity: Identity, study_uid: str, study_index: int) -> Dataset:
    """Patient and study modules (what every object of the study shares)."""
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    ds.PatientName = identity.name
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = identity.birth_date
    ds.PatientSex = identity.sex
    ds.AccessionNumber = identity.accession(study_index)
    ds.InstitutionName = identity.institution
    ds.ReferringPhysicianName = "Referrer^Synthetic"
    ds.StudyDate = f"2020{study_index + 3:02d}15"
    ds.StudyTime = "101500"
    ds.StudyID = str(study_index)
    ds.Manufacturer = "medml-synth"
    return ds


def file_meta(sop_class: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def image_header(
    identity: Identity,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    study_index: int,
    meta: SeriesMeta,
) -> Dataset:
    """Header of a CT or MR image series, without the per-slice and geometry tags."""
    sop_class = CTImageStorage if meta.modality == "CT" else MRImageStorage
    ds = patient_study_header(identity, study_uid, study_index)
    ds.file_meta = file_meta(sop_class)
    ds.SOPClassUID = sop_class
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.Modality = meta.modality
    ds.ImageType = list(meta.image_type)
    ds.SeriesNumber = meta.series_number
    if meta.description:
        ds.SeriesDescription = meta.description
    ds.BodyPartExamined = meta.body_part
    ds.PatientPosition = "HFS"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    if meta.modality == "CT":
        ds.BitsStored, ds.HighBit = 12, 11
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "-600"
        ds.WindowWidth = "1500"
        ds.KVP = "120"
    else:
        ds.BitsStored, ds.HighBit = 16, 15
        t1 = meta.weighting != "T2"
        ds.ScanningSequence = "GR" if t1 else "SE"
        ds.SequenceVariant = "SP" if t1 else "SK"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D" if t1 else "2D"
        ds.RepetitionTime = "4.5" if t1 else "1400"
        ds.EchoTime = "2.1" if t1 else "90"
        ds.EchoTrainLength = 1 if t1 else 128
        ds.FlipAngle = "10" if t1 else "150"
        ds.MagneticFieldStrength = "1.5"
        ds.ImagingFrequency = "63.9"
        ds.ImagedNucleus = "1H"
    return ds
