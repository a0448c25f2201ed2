"""A realistic, messy export around the clean scans (``--messy``), with its expected ingest outcome.

Hospital exports carry more than the series one wants: scout/localizer images, radiation dose
reports (DICOM SR), screenshots saved as secondary captures, the same series exported twice, a
series that lost a slice on the way, files truncated by an interrupted copy, and notes. Each is
written next to a clean study, and :data:`EXPECTED` records the outcome that the agreed default
ingest policy gives it (status and the start of the reason), so tests can hold ingestion to it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import SecondaryCaptureImageStorage

from medml.io import atomic_path, atomic_write_text
from medml.synth.identity import Identity
from medml.synth.phantom import Grid
from medml.synth.writers import (
    SeriesMeta,
    _uid,
    file_meta,
    image_header,
    patient_study_header,
    stored_values,
    write_dicom_series,
)

XRAY_DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"  # X-Ray Radiation Dose SR Storage
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

# case -> (status, reason prefix), per the agreed default ingest policy.
EXPECTED = {
    "clean": ("ingested", None),
    "not-image-file": ("skipped", "not DICOM or NIfTI"),
    "localizer": ("skipped", "localizer"),
    "dose-report": ("skipped", "non-image DICOM object"),
    "secondary-capture": ("skipped", "derived or secondary capture"),
    "duplicate-series": ("skipped", "duplicate of "),
    "missing-slice": ("quarantined", "missing slice"),
    "truncated": ("quarantined", "unreadable DICOM"),
    "empty-dcm": ("quarantined", "unreadable DICOM"),
}

README = """\
Export from PACS (synthetic, written by medml synth --messy).

Besides the diagnostic series this export contains what real exports carry: localizers,
a dose report, secondary captures, a series exported twice, a series with a missing slice
and a file truncated by an interrupted copy. expected_ingest.json says what ingest should do
with each file.
"""


@dataclass(frozen=True)
class DicomStudy:
    """A clean study written as DICOM, which the messy extras are placed around."""

    folder: Path  # the series folder, absolute
    volume: np.ndarray
    grid: Grid
    identity: Identity
    study_uid: str
    study_index: int
    uid_seed: str
    slice_thickness: float
    meta: SeriesMeta


def write_messy(out: Path, src: DicomStudy) -> dict[str, str]:
    """Write the messy extras around ``src``; return ``relative path -> case`` for each file."""
    cases: dict[str, str] = {}
    study_dir = src.folder.parent

    def mark(paths: list[Path], case: str) -> None:
        for p in paths:
            cases[p.relative_to(out).as_posix()] = case

    atomic_write_text(out / "README.txt", README)
    mark([out / "README.txt"], "not-image-file")

    # The same series exported twice: byte-identical copies in a sibling folder.
    # "_copy" sorts after the original both as a folder name and in full paths ("-" < "/" < "_"),
    # so the original is the first copy seen however the ingestion orders its walk.
    dup = study_dir / f"{src.folder.name}_copy"
    dup.mkdir(parents=True, exist_ok=True)
    copies = []
    for f in sorted(src.folder.glob("*.dcm")):
        with atomic_path(dup / f.name, suffix=".dcm") as tmp:
            shutil.copyfile(f, tmp)
        copies.append(dup / f.name)
    mark(copies, "duplicate-series")

    # A reconstruction of the same study that lost a middle slice in transfer.
    meta = SeriesMeta(
        src.meta.modality,
        series_number=2,
        description="lost slice",
        body_part=src.meta.body_part,
        image_type=src.meta.image_type,
        weighting=src.meta.weighting,
    )
    written = _write_variant(
        src, study_dir / "series-2-missing-slice", "missing", meta, skip=(src.grid.nz // 2,)
    )
    mark(written, "missing-slice")

    mark(_localizer(study_dir / "localizer", src), "localizer")
    mark([_structured_report(study_dir / "dose-report" / "SR0001.dcm", src)], "dose-report")
    mark(_secondary_captures(study_dir / "secondary", src), "secondary-capture")

    # An interrupted copy: a complete header, then the pixel data stops half way.
    trunc_dir = study_dir / "series-3-truncated"
    (full,) = _write_variant(
        src,
        trunc_dir,
        "truncated",
        SeriesMeta(src.meta.modality, 3, "interrupted", src.meta.body_part),
        volume=src.volume[:1],
        grid=Grid(1, src.grid.ny, src.grid.nx, src.grid.spacing, src.grid.origin, src.grid.iop),
    )
    data = full.read_bytes()
    with atomic_path(full, suffix=".dcm") as tmp:
        tmp.write_bytes(data[: len(data) - src.grid.ny * src.grid.nx])  # half the pixels
    mark([full], "truncated")
    empty = trunc_dir / "IM0002.dcm"
    with atomic_path(empty, suffix=".dcm") as tmp:
        tmp.write_bytes(b"")
    mark([empty], "empty-dcm")
    return cases


def _write_variant(
    src: DicomStudy,
    folder: Path,
    tag: str,
    meta: SeriesMeta,
    volume: np.ndarray | None = None,
    grid: Grid | None = None,
    skip: tuple[int, ...] = (),
) -> list[Path]:
    """Another series of ``src``'s study and patient (UIDs seeded by ``tag``)."""
    seed = f"{src.uid_seed}-{tag}"
    return write_dicom_series(
        src.volume if volume is None else volume,
        grid or src.grid,
        folder,
        src.identity,
        src.study_uid,
        _uid(seed, "series"),
        src.study_index,
        seed,
        src.slice_thickness,
        meta,
        skip=skip,
    )


def _localizer(folder: Path, src: DicomStudy) -> list[Path]:
    """A tri-plane scout: one image in each of three orthogonal planes through the centre."""
    vol, g = src.volume, src.grid
    seed = src.uid_seed + "-localizer"
    meta = SeriesMeta(
        src.meta.modality,
        series_number=99,
        description="localizer",
        body_part=src.meta.body_part,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        weighting=src.meta.weighting,
    )
    ds = image_header(
        src.identity,
        src.study_uid,
        _uid(seed, "series"),
        _uid(seed, "frame"),
        src.study_index,
        meta,
    )
    row, col, nrm = np.asarray(g.iop[:3]), np.asarray(g.iop[3:]), g.normal
    corner = g.position(0)
    mid = np.array(g.shape) // 2
    planes = [  # (pixels, row dir, col dir, row spacing, col spacing, position)
        (vol[mid[0]], row, col, g.spacing[1], g.spacing[2], corner + mid[0] * g.spacing[0] * nrm),
        (
            vol[:, mid[1], :],
            row,
            nrm,
            g.spacing[0],
            g.spacing[2],
            corner + mid[1] * g.spacing[1] * col,
        ),
        (
            vol[:, :, mid[2]],
            col,
            nrm,
            g.spacing[0],
            g.spacing[1],
            corner + mid[2] * g.spacing[2] * row,
        ),
    ]
    paths = []
    for i, (pix, r, c, dr, dc, pos) in enumerate(planes):
        sop = _uid(seed, "sop", str(i))
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = i + 1
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*r, *c)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.PixelSpacing = [f"{dr:.6f}", f"{dc:.6f}"]
        ds.SliceThickness = f"{src.slice_thickness:.4f}"
        ds.Rows, ds.Columns = pix.shape
        ds.PixelData = np.ascontiguousarray(stored_values(pix, meta.modality)).tobytes()
        path = folder / f"IM{i + 1:04d}.dcm"
        with atomic_path(path, suffix=".dcm") as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        paths.append(path)
    return paths


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _num(code: Dataset, value: float, unit: str) -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "NUM"
    item.ConceptNameCodeSequence = Sequence([code])
    mv = Dataset()
    mv.NumericValue = f"{value:.2f}"
    mv.MeasurementUnitsCodeSequence = Sequence([_code(unit, "UCUM", unit)])
    item.MeasuredValueSequence = Sequence([mv])
    return item


def _structured_report(path: Path, src: DicomStudy) -> Path:
    """A CT radiation dose report (X-Ray Radiation Dose SR); for MR, a plain-text report SR."""
    seed = src.uid_seed + "-sr"
    ct = src.meta.modality == "CT"
    sop_class = XRAY_DOSE_SR if ct else BASIC_TEXT_SR
    ds = patient_study_header(src.identity, src.study_uid, src.study_index)
    ds.file_meta = file_meta(sop_class)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(seed, "sop")
    ds.SeriesInstanceUID = _uid(seed, "series")
    ds.Modality = "SR"
    ds.SeriesNumber = 997
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    if ct:
        ds.ConceptNameCodeSequence = Sequence(
            [_code("113701", "DCM", "X-Ray Radiation Dose Report")]
        )
        ds.ContentSequence = Sequence(
            [
                _num(_code("113830", "DCM", "Mean CTDIvol"), 6.8, "mGy"),
                _num(_code("113838", "DCM", "DLP"), 245.0, "mGy.cm"),
            ]
        )
    else:
        ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic imaging report")])
        text = Dataset()
        text.RelationshipType, text.ValueType = "CONTAINS", "TEXT"
        text.ConceptNameCodeSequence = Sequence([_code("121071", "DCM", "Finding")])
        text.TextValue = "Liver morphology assessed; see images."
        ds.ContentSequence = Sequence([text])
    with atomic_path(path, suffix=".dcm") as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def _secondary_captures(folder: Path, src: DicomStudy) -> list[Path]:
    """Two screenshots of the middle slice, as Secondary Capture objects (no image geometry)."""
    seed = src.uid_seed + "-sc"
    vol = src.volume
    lo, hi = np.percentile(vol, (1, 99))
    ds = patient_study_header(src.identity, src.study_uid, src.study_index)
    ds.file_meta = file_meta(SecondaryCaptureImageStorage)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SeriesInstanceUID = _uid(seed, "series")
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SeriesNumber = 998
    ds.SeriesDescription = "key images"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.BurnedInAnnotation = "NO"
    paths = []
    for i, k in enumerate((vol.shape[0] // 3, vol.shape[0] // 2)):
        img = np.clip((vol[k] - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
        sop = _uid(seed, "sop", str(i))
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = i + 1
        ds.Rows, ds.Columns = img.shape
        ds.PixelData = img.tobytes()
        path = folder / f"SC{i + 1:04d}.dcm"
        with atomic_path(path, suffix=".dcm") as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        paths.append(path)
    return paths
