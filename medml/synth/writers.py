"""Write rendered volumes as real DICOM series (pydicom) or NIfTI (nibabel)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

from medml.io import atomic_path
from medml.synth.identity import Identity
from medml.synth.phantom import Grid

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_nifti(volume: np.ndarray, grid: Grid, path: Path, description: str = "") -> None:
    """Write ``[slice, row, col]`` HU data as NIfTI with its RAS affine.

    ``description`` lands in the header's ``descrip`` field, as some exporters do with names.
    """
    data = np.transpose(np.rint(volume).astype(np.int16), (2, 1, 0))  # -> (col, row, slice)
    img = nib.Nifti1Image(data, LPS_TO_RAS @ grid.lps_affine())
    img.header["descrip"] = description.encode()[:79]
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, tmp)


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
) -> None:
    """Write one CT series, one file per slice, with full geometry and identity tags."""
    stored = np.rint(volume + 1024.0).clip(0, 4095).astype(np.uint16)  # intercept -1024
    dz, dy, dx = grid.spacing
    z0, y0, x0 = grid.origin
    ds = _ct_header(identity, study_uid, series_uid, _uid(uid_seed, "frame"), study_index)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [f"{dy:.6f}", f"{dx:.6f}"]  # row spacing, column spacing
    ds.SliceThickness = f"{slice_thickness:.4f}"
    ds.Rows, ds.Columns = grid.ny, grid.nx
    for k in range(grid.nz):  # one header, updated per slice: building it is the slow part
        sop_uid = _uid(uid_seed, "sop", str(k))
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{x0:.4f}", f"{y0:.4f}", f"{z0 + k * dz:.4f}"]
        ds.SliceLocation = f"{z0 + k * dz:.4f}"
        ds.PixelData = stored[k].tobytes()
        with atomic_path(folder / f"IM{k + 1:04d}.dcm", suffix=".dcm") as tmp:
            ds.save_as(tmp, enforce_file_format=True)


def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=list(parts))


def _ct_header(
    identity: Identity, study_uid: str, series_uid: str, frame_uid: str, study_index: int
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientName = identity.name
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = identity.birth_date
    ds.PatientSex = identity.sex
    ds.AccessionNumber = identity.accession(study_index)
    ds.InstitutionName = identity.institution
    ds.ReferringPhysicianName = "Referrer^Synthetic"
    ds.StudyDate = f"2020{study_index + 3:02d}15"
    ds.SeriesNumber = 1
    ds.StudyID = str(study_index)
    ds.Manufacturer = "medml-synth"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    ds.BurnedInAnnotation = "NO"
    return ds
