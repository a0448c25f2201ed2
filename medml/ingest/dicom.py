"""DICOM series: index headers, classify objects, group into series, stack slices exactly.

Slices are sorted along the slice normal (ImagePositionPatient . normal), never by
InstanceNumber; RescaleSlope/Intercept are applied per slice; the affine maps voxel indices
``(column, row, slice)`` to RAS millimetres. Enhanced (multi-frame) objects are expanded into
one :class:`Slice` per frame with the frame's own geometry and rescale, so they go through the
same grouping and checks as classic one-file-per-slice series.

pydicom indexes and decodes: native syntaxes itself, RLE itself, JPEG (baseline, lossless),
JPEG-LS and JPEG 2000 through the pylibjpeg plugins (pylibjpeg-libjpeg, pylibjpeg-openjpeg,
pylibjpeg-rle). Native little-endian pixel data is read straight from the file bytes at the
offset the header read recorded (a hand-written fast path: pydicom's own decoder re-parses the
whole file per slice and is several times slower). Deflated files are inflated here, with an
output cap, into the Explicit VR Little Endian file they encode (pydicom would inflate them
whole). What a header claims is checked against the budget (:mod:`medml.ingest.budget`) before
any pixel is decoded.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from medml.ingest import budget, mosaic, scan, volumes
from medml.ingest.volumes import Unresolved

if TYPE_CHECKING:
    import pydicom
    from pydicom.errors import InvalidDicomError

# pydicom (~0.12 s of import, requests included) is imported where a file needs it: plain
# native files are indexed by medml.ingest.scan and their pixels read from the file bytes.
__all__ = ["InvalidDicomError"]


def __getattr__(name: str) -> Any:
    if name == "InvalidDicomError":  # pydicom's, for callers' except clauses
        from pydicom.errors import InvalidDicomError

        return InvalidDicomError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
PIXEL_DATA = 0x7FE00010
# Values larger than this are not read with the header (pixel data is seeked over).
DEFER_BYTES = 4096
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")
NATIVE_LE = {scan.EXPLICIT_LE, scan.IMPLICIT_LE}

NON_IMAGE_MODALITIES = {
    "SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "RTIMAGE", "SEG", "PR", "KO", "ECG",
    "AU", "HD", "DOC", "REG", "PLAN", "FID", "RWV", "RESP", "EPS", "HC", "BI",
}  # fmt: skip
# SOP class UID prefixes of objects that hold no image volume.
NON_IMAGE_SOP_PREFIXES = {
    "1.2.840.10008.1.3.10": "DICOMDIR",
    "1.2.840.10008.5.1.4.1.1.88.": "structured report / key object",
    "1.2.840.10008.5.1.4.1.1.481.": "RT object",
    "1.2.840.10008.5.1.4.1.1.66": "raw data / registration / segmentation",
    "1.2.840.10008.5.1.4.1.1.11.": "presentation state",
    "1.2.840.10008.5.1.4.1.1.9.": "waveform",
    "1.2.840.10008.5.1.4.1.1.104.": "encapsulated document",
}
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
# Header attributes that tell the volumes of a 4D series apart (see medml.ingest.volumes).
FOUR_D_KEYS = (
    "EchoNumbers",
    "TemporalPositionIdentifier",
    "TemporalPositionIndex",
    "AcquisitionNumber",
    "TriggerTime",
    "DiffusionBValue",
    "DiffusionGradientOrientation",
    "EchoTime",
)
# Vendors' private volume indices, read (as dcm2niix does) by fixed tag for that vendor:
# name -> (manufacturer prefix, tag).
PRIVATE_KEYS = {
    "PhilipsPhaseNumber": ("PHILIPS", (0x2001, 0x1008)),
    "PhilipsGradientNumber": ("PHILIPS", (0x2005, 0x1413)),
    "PhilipsBValue": ("PHILIPS", (0x2001, 0x1003)),
    "SiemensBValue": ("SIEMENS", (0x0019, 0x100C)),
    "SiemensGradient": ("SIEMENS", (0x0019, 0x100E)),
    "GEBValue": ("GE", (0x0043, 0x1039)),
}
VOLUME_KEY_FIELDS = (*FOUR_D_KEYS, "PhilipsPhaseNumber", "PhilipsGradientNumber")
# private b-value / gradient names standing in for the standard ones where those are absent
PRIVATE_DIFFUSION = {
    "DiffusionBValue": ("PhilipsBValue", "SiemensBValue", "GEBValue"),
    "DiffusionGradientOrientation": ("SiemensGradient",),
}


class SeriesError(ValueError):
    """A series that cannot become a trustworthy volume; the message is the quarantine reason."""

    def __init__(self, message: str, case: str = "conversion") -> None:
        super().__init__(message)
        self.case = case


@dataclass(frozen=True)
class Problem:
    """A policy case (see IngestConfig) and the human-readable reason."""

    case: str
    reason: str


HEADER_FIELDS = (
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID",
    "StudyDate", "Modality", "Rows", "Columns", "ImagePositionPatient",
    "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "RescaleSlope",
    "RescaleIntercept", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel",
    "NumberOfFrames", "ImageType", "BurnedInAnnotation", "InstanceNumber", "HighBit",
    "SpacingBetweenSlices", "Manufacturer", "SeriesNumber", *FOUR_D_KEYS,
)  # fmt: skip


class Header(dict):
    """The few header values conversion needs, as plain Python values.

    Small and cheap to pickle (a pydicom Dataset is ~3 kB pickled and slow to unpickle), so
    thousands of slices travel to worker processes quickly. Reads like a Dataset: ``h.Rows``,
    ``h.get("PatientID")``, ``"Rows" in h``.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getstate__(self):
        return dict(self)

    def __setstate__(self, state):
        self.update(state)


def _plain(value: Any) -> Any:
    """pydicom values (MultiValue, DSfloat, IS, UID, PersonName) as builtins."""
    multival = sys.modules.get("pydicom.multival")  # no MultiValue before pydicom is imported
    many = (list, tuple) if multival is None else (list, tuple, multival.MultiValue)
    if isinstance(value, many):
        return [_plain(v) for v in value]
    for kind in (int, float):
        if isinstance(value, kind):
            return kind(value)
    return str(value)


def _private_value(value: Any) -> Any:
    """A private value as a comparable builtin (undecoded bytes, e.g. implicit VR UN: as hex)."""
    if isinstance(value, bytes):
        return value.hex()
    return _plain(value)


FIELD_BY_TAG = {scan.TAG_BY_KEYWORD[name]: name for name in HEADER_FIELDS}


def compact_header(ds: pydicom.Dataset) -> Header:
    """A :class:`Header` from a Dataset read by :func:`read_header` (frames expanded)."""
    h = Header()
    # the tags present (iterating a Dataset itself would convert every element)
    for tag in ds.keys():  # noqa: SIM118
        name = FIELD_BY_TAG.get(tag)
        if name is not None:
            value = ds[tag].value
            if value not in (None, ""):
                h[name] = _plain(value)
    maker = str(h.get("Manufacturer", "")).upper()
    for name, (vendor, tag) in PRIVATE_KEYS.items():
        if maker.startswith(vendor) and tag in ds:
            value = ds[tag].value
            if value not in (None, "", b""):
                h[name] = _private_value(value)
    for name, private in PRIVATE_DIFFUSION.items():
        if name not in h:
            found = [h[p] for p in private if p in h]
            if found:
                h[name] = found[0]
    if mosaic.is_mosaic(ds):
        h["_mosaic"] = mosaic.mosaic_info(ds)
    meta = getattr(ds, "file_meta", None)
    h["TransferSyntaxUID"] = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if INFLATED_SIZE in ds.__dict__:  # read from a deflated file: offsets are into the inflated
        h["_inflated_size"] = ds.__dict__[INFLATED_SIZE]
    elem = _pixel_element(ds)
    h["_pixel_tell"] = getattr(elem, "value_tell", None)
    if is_multiframe(ds):
        n = int(ds.get("NumberOfFrames", 1) or 1)
        h["_frames"] = [{k: _plain(v) for k, v in _frame_geometry(ds, i).items()} for i in range(n)]
        h["_dim_positions"] = _dimension_positions(ds)
    return h


# Dimension index pointers that only say where a frame sits in its stack.
IN_STACK_POINTERS = {0x00209057, 0x00200032}  # InStackPositionNumber, ImagePositionPatient


def _is_dataset(value: Any) -> bool:
    """Whether ``value`` is a pydicom Dataset (none exists before pydicom is imported)."""
    module = sys.modules.get("pydicom")
    return module is not None and isinstance(value, module.Dataset)


def _dimension_positions(ds: pydicom.Dataset) -> list[int]:
    """Indices into DimensionIndexValues that tell stacks, echoes and volumes apart."""
    dims = ds.get("DimensionIndexSequence") or []
    return [i for i, d in enumerate(dims) if int(d.get("DimensionIndexPointer", 0) or 0)
            not in IN_STACK_POINTERS]  # fmt: skip


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


@dataclass
class Slice:
    """One image plane: a single-frame file, one frame of a multi-frame file, or one tile of a
    Siemens mosaic.

    ``header`` may be a pydicom Dataset (it is then reduced to a :class:`Header`).
    """

    path: Path
    header: Header
    frame: int | None = None
    geometry: dict[str, Any] | None = None  # per-frame / per-tile overrides
    tile: int | None = None  # index of the tile in a mosaic

    def __post_init__(self) -> None:
        if _is_dataset(self.header):
            self.header = compact_header(self.header)

    def __setattr__(self, name: str, value: Any) -> None:
        # a new header or geometry (replaced, never edited in place) drops the cached values
        object.__setattr__(self, name, value)
        for cached in ("position", "orientation", "instance_key"):
            self.__dict__.pop(cached, None)

    def _get(self, name: str, default: Any = None) -> Any:
        if self.geometry and name in self.geometry:
            return self.geometry[name]
        return self.header.get(name, default)

    # Cached (grouping, checks and the stack invariant ask for them thousands of times) until
    # the header or geometry is replaced; read-only arrays, so no caller edits them.
    @cached_property
    def position(self) -> np.ndarray:
        return _frozen(np.array(self._get("ImagePositionPatient"), dtype=float))

    @cached_property
    def orientation(self) -> np.ndarray:
        return _frozen(np.array(self._get("ImageOrientationPatient"), dtype=float))

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        row, col = (float(v) for v in self._get("PixelSpacing"))
        return row, col

    @property
    def rescale(self) -> tuple[float, float]:
        slope = self._get("RescaleSlope", 1)
        intercept = self._get("RescaleIntercept", 0)
        return float(slope if slope not in (None, "") else 1), float(intercept or 0)

    def key_value(self, name: str) -> Any:
        value = self._get(name)
        return None if value in (None, "") else str(value)

    @property
    def matrix(self) -> tuple[int, int]:
        return int(self._get("Rows")), int(self._get("Columns"))

    @property
    def instance_number(self) -> int:
        try:
            return int(self.header.get("InstanceNumber", 0) or 0)
        except (TypeError, ValueError):
            return 0

    @cached_property
    def instance_key(self) -> tuple:
        """Equal for copies of one plane: the same SOP instance, frame and tile, and the same
        volume keys (writers that reuse one SOPInstanceUID for several echoes exist)."""
        sop = self.header.get("SOPInstanceUID") or str(self.path)
        return (sop, self.frame, self.tile, *(self.key_value(k) for k in VOLUME_KEY_FIELDS))

    @property
    def container(self) -> tuple | None:
        """What groups this plane before any header key: its mosaic file, or for a frame of an
        enhanced object its dimension index without the in-stack position (frames of several
        files with one index, e.g. one frame per file, form one stack); None for a plain file.
        """
        if self.tile is not None:
            return ("mosaic", self.header.get("SOPInstanceUID") or str(self.path))
        if self.frame is not None:
            dims = (self.geometry or {}).get("DimensionIndexValues")
            keep = self.header.get("_dim_positions") or []
            if dims is not None:
                dims = dims if isinstance(dims, list) else [dims]  # VM 1 reads as a number
                dims = tuple(dims[i] for i in keep if i < len(dims))
            return ("frames", dims)
        return None


@dataclass
class Series:
    """Slices of one volume: a SeriesInstanceUID, orientation and matrix size, and where the
    series holds several volumes, what tells this one apart (``split_by``, ``keys``).

    ``problem`` is set where the series' planes could not be resolved into volumes: the series
    is then quarantined with that reason, never converted.
    """

    uid: str
    slices: list[Slice] = field(default_factory=list)
    split_by: str | None = None  # what this series was split from its siblings on, if any
    notes: list[str] = field(default_factory=list)
    keys: dict[str, Any] = field(default_factory=dict)
    problem: Problem | None = None
    n_volumes: int = 1  # volumes the source series held

    def stack(self) -> volumes.Volume:
        return volumes.Volume(self.slices, self.split_by, None, dict(self.keys))

    @property
    def first(self) -> Header:
        return self.slices[0].header

    @property
    def paths(self) -> list[Path]:
        return sorted({s.path for s in self.slices})


# ----------------------------------------------------------------------------- reading headers


def _looks_like_headerless_dicom(path: Path) -> bool:
    """Old exports write DICOM without the 128-byte preamble: it then starts with group 0008."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return len(head) == 4 and head[:2] == b"\x08\x00" and head[2] in (0, 5, 8, 0x10, 0x16, 0x18)


def _tags_read() -> list:
    """Every attribute classification and conversion look at: only these are parsed (pydicom
    seeks over the values of all others, and over whole sequences not listed: a third less
    time per file, far less for vendors' large private sequences)."""
    private = [tag for _, tag in PRIVATE_KEYS.values()]
    private += [mosaic.CSA_IMAGE_HEADER, mosaic.SIEMENS_N_MOSAIC]
    creators = sorted({(group, element >> 8) for group, element in private})
    return [
        *HEADER_FIELDS, "PhotometricInterpretation", "PerFrameFunctionalGroupsSequence",
        "SharedFunctionalGroupsSequence", "DimensionIndexSequence", "PixelData", *private,
        *creators,
    ]  # fmt: skip


TAGS_READ = _tags_read()


def read_header(path: Path, max_voxels: int = budget.MAX_VOXELS) -> pydicom.Dataset:
    """Read the DICOM attributes ingestion uses (:data:`TAGS_READ`), pixel data deferred.

    A Deflated Explicit VR Little Endian file is inflated here with an output cap
    (:func:`inflated_equivalent`; pydicom would inflate it whole, however large), and its
    offsets then refer to the inflated bytes. Raises InvalidDicomError for files that are not
    DICOM, :class:`budget.BudgetError` for claims over the budget, others for broken files.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with path.open("rb") as fh:
            if _is_deflated(fh):
                fh.seek(0)
                return _read_deflated(fh.read(), max_voxels)
            fh.seek(0)
            ds = pydicom.dcmread(fh, defer_size=DEFER_BYTES, specific_tags=TAGS_READ)
        if PIXEL_DATA not in ds:  # no image, or a file cut short: read all, to tell which
            ds = pydicom.dcmread(path, defer_size=DEFER_BYTES)
        return ds
    except InvalidDicomError:
        if _looks_like_headerless_dicom(path):
            ds = pydicom.dcmread(path, defer_size=DEFER_BYTES, force=True, specific_tags=TAGS_READ)
            if "SOPClassUID" in ds:
                return ds
        raise


def index_header(path: Path, max_voxels: int = budget.MAX_VOXELS) -> pydicom.Dataset:
    """The header for indexing: :mod:`medml.ingest.scan`'s reader (plain native files, ~10x
    faster), or :func:`read_header` for every file it declines. Both read the same values;
    classification and :func:`compact_header` take either."""
    try:
        return scan.read(path)  # type: ignore[return-value]
    except (scan.Declined, OSError):
        return read_header(path, max_voxels)


# ----------------------------------------------------------------------------- deflated files

DEFLATE_PEEK = 4096  # the file meta (which names the transfer syntax) is in the first bytes
DEFLATED_UID = b"1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
HEADER_PREFIX = 1 << 20  # inflated bytes first searched for the image size
HEADER_MAX = 64 << 20  # a header (before the image size) larger than this is refused
TRAILING_BYTES = 8 << 20  # allowed after the pixel data (padding, signatures)
INFLATED_SIZE = "_medml_inflated_size"  # Dataset attribute: size of the bytes parsed
CLAIM_FIELDS = ("NumberOfFrames", "SamplesPerPixel", "Rows", "Columns", "BitsAllocated")
CLAIM_TAGS = [scan.TAG_BY_KEYWORD[name] for name in CLAIM_FIELDS]
BITS_ALLOCATED = 0x00280100


def _is_deflated(fh: BinaryIO) -> bool:
    """Whether the file meta names the deflated syntax: a byte search of the first 4 KB, or
    where the meta group is longer than that, pydicom's reading of it."""
    head = fh.read(DEFLATE_PEEK)
    if DEFLATED_UID in head:
        return True
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        return False
    if 144 + int.from_bytes(head[140:144], "little") <= len(head):
        return False
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fh.seek(0)
    read_preamble(fh, False)
    return str(_read_file_meta_info(fh).get("TransferSyntaxUID", "")) == DEFLATED_UID.decode()


def _prefix_claim(prefix: bytes) -> tuple[str, list[int], float] | None:
    """The image size an inflated dataset prefix claims (text, dims, bytes per item; dims of 0
    where the dataset has no Rows/Columns), or None where the prefix ends before BitsAllocated
    (or inside an element)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset

    passed = []

    def stop(tag, vr, length) -> bool:
        if tag > BITS_ALLOCATED:
            passed.append(tag)
            return True
        return False

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dataset(DicomBytesIO(prefix), False, True, stop_when=stop,
                              specific_tags=CLAIM_TAGS)  # fmt: skip
        if "BitsAllocated" not in ds and not passed:
            return None
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 16) or 16)
    except Exception:  # the prefix ends inside an element: inflate more
        return None
    what = f"{rows} x {cols} pixels x {frames} frames x {samples} samples of {bits} bits"
    return what, [rows, cols, frames, samples], bits / 8


def inflated_equivalent(raw: bytes, max_voxels: int, expected: int | None = None) -> bytes:
    """A deflated DICOM file as the Explicit VR Little Endian file it encodes, inflated with a cap.

    The dataset is inflated in steps: a prefix until the image size (Rows, Columns, frames,
    bits) is known, that claim is checked against ``max_voxels``, then the rest up to the prefix
    plus the pixel bytes claimed plus :data:`TRAILING_BYTES`; a stream inflating past that is
    refused. ``expected``: the size a first read found (the pixels are read later): the file
    must inflate to exactly that.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.filewriter import write_file_meta_info

    fh = io.BytesIO(raw)
    read_preamble(fh, False)
    meta = FileMetaDataset(_read_file_meta_info(fh))
    inflater = budget.Inflater(memoryview(raw)[fh.tell() :], budget.DEFLATE_WBITS)
    meta.TransferSyntaxUID = scan.EXPLICIT_LE
    if "FileMetaInformationGroupLength" in meta:
        del meta.FileMetaInformationGroupLength  # read without: group 2 ends where it ends
    out = DicomBytesIO()
    out.write(raw[:128] + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=False)
    head = out.getvalue()
    if expected is not None:
        data = inflater.read_exactly("the size first read", expected - len(head))
    else:
        data = _inflate_dataset(inflater, max_voxels)
    return head + data


def _inflate_dataset(inflater: budget.Inflater, max_voxels: int) -> bytes:
    limit, claim = HEADER_PREFIX, None
    while claim is None:
        inflater.fill(limit)
        claim = _prefix_claim(inflater.data())
        if claim is None and inflater.eof:
            return inflater.data()
        if claim is None and limit >= HEADER_MAX:
            raise budget.BudgetError(
                f"too large: deflated DICOM without an image size in its first "
                f"{budget.size_text(HEADER_MAX)}"
            )
        limit *= 4
    what, dims, item = claim
    pixels = budget.check_claim(what, dims, item, max_voxels)
    # no image size (not an image, or broken): as much as a header may hold
    cap = inflater.size + pixels + TRAILING_BYTES if pixels else max(HEADER_MAX, inflater.size)
    if inflater.fill(cap + 1) > cap:
        raise budget.BudgetError(
            f"too large: deflated DICOM inflates past {budget.size_text(cap)}, more than its "
            f"header claims ({what})"
        )
    return inflater.data()


def _read_deflated(raw: bytes, max_voxels: int) -> pydicom.Dataset:
    import pydicom

    blob = inflated_equivalent(raw, max_voxels)
    ds = pydicom.dcmread(io.BytesIO(blob), defer_size=DEFER_BYTES)
    ds.__dict__[INFLATED_SIZE] = len(blob)
    return ds


def has_dicom_name(path: Path) -> bool:
    return path.suffix.lower() in DICOM_SUFFIXES


def is_dicom(path: Path) -> bool:
    try:
        read_header(path)
    except Exception:
        return False
    return True


def _pixel_element(ds: pydicom.Dataset):
    return ds.get_item(PIXEL_DATA, keep_deferred=True) if PIXEL_DATA in ds else None


def _truncation(ds: pydicom.Dataset) -> str | None:
    """The last element (usually pixel data) runs past the end of the file.

    pydicom accepts short final values silently (deferred ones are seeked over), so a cut
    file otherwise reads as a whole one; raw elements still carry their offset and length.
    """
    if not len(ds):
        return None
    elem = ds.get_item(max(ds.keys()), keep_deferred=True)
    length = getattr(elem, "length", None)
    tell = getattr(elem, "value_tell", None)
    name = getattr(ds, "filename", None)
    size = ds.__dict__.get(INFLATED_SIZE)  # deflated: offsets are into the inflated bytes
    if size is None and isinstance(name, str):
        size = os.path.getsize(name)
    if elem is None or length in (None, 0xFFFFFFFF) or tell is None or size is None:
        return None
    if tell + length > size:
        return f"truncated: data needs {tell + length} bytes, file has {size}"
    return None


def _multiframe_geometry_missing(ds: pydicom.Dataset) -> list[str]:
    shared = ds.get("SharedFunctionalGroupsSequence") or [{}]  # {}: nothing is in it
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or [{}]
    groups = ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence")
    return [g for g in groups if g not in shared[0] and g not in per_frame[0]]


def is_multiframe(ds: pydicom.Dataset) -> bool:
    return int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds


def image_problem(ds: pydicom.Dataset) -> str | None:
    """Why this DICOM object cannot be a slice of an image volume, or None if it can.

    Covers non-image objects, missing pixel data or geometry, and truncated files.
    """
    problem = classify(ds)
    if problem and problem.case in {"unreadable", "non_image", "no_pixels"}:
        return problem.reason
    return None


def _claim_problem(ds: pydicom.Dataset, max_voxels: int) -> Problem | None:
    """The pixels the header claims, against the ceiling, and (uncompressed) the bytes held."""
    if PIXEL_DATA not in ds:
        return None
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 16) or 16)
    what = f"{rows} x {cols} pixels x {frames} frames x {samples} samples of {bits} bits"
    try:
        needed = budget.check_claim(what, [rows, cols, frames, samples], bits / 8, max_voxels)
        meta = getattr(ds, "file_meta", None)
        syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
        length = getattr(_pixel_element(ds), "length", None)
        if not _encapsulated(syntax) and length not in (None, 0xFFFFFFFF):
            budget.check_held(what, needed, length)  # native pixel data
    except budget.BudgetError as exc:
        case = "too_large" if str(exc).startswith("too large") else "unreadable"
        return Problem(case, f"{'' if case == 'too_large' else 'unreadable DICOM: '}{exc}")
    return None


def _encapsulated(syntax: str) -> bool:
    """Whether pixel data in this transfer syntax is encapsulated (pydicom's answer; the
    native ones, all :mod:`.scan` reads, without importing pydicom)."""
    if not syntax or syntax in NATIVE_LE:
        return False
    from pydicom.uid import UID

    return UID(syntax).is_encapsulated


def series_budget_problem(series: Series, max_voxels: int) -> Problem | None:
    """A series whose planes together claim more than ``max_voxels``: refused before decoding."""
    rows, cols = series.slices[0].matrix
    what = f"{len(series.slices)} planes of {rows} x {cols} pixels"
    try:
        budget.check_claim(what, [len(series.slices), rows, cols], 1, max_voxels)
    except budget.BudgetError as exc:
        return Problem("too_large", str(exc))
    return None


def classify(ds: pydicom.Dataset, max_voxels: int = budget.MAX_VOXELS) -> Problem | None:
    """The policy case of one DICOM object (None: an ordinary original image slice).

    The pixels the header claims are checked first (:mod:`medml.ingest.budget`), so nothing
    later decodes a claim over ``max_voxels`` or more than an uncompressed file holds.
    """
    truncated = _truncation(ds)
    if truncated:
        return Problem("unreadable", f"unreadable DICOM: {truncated}")
    claimed = _claim_problem(ds, max_voxels)
    if claimed:
        return claimed
    sop = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
    modality = str(ds.get("Modality", ""))
    for prefix, what in NON_IMAGE_SOP_PREFIXES.items():
        if sop.startswith(prefix):
            return Problem("non_image", f"non-image DICOM object ({what}, Modality {modality})")
    if modality in NON_IMAGE_MODALITIES:
        return Problem("non_image", f"non-image DICOM object (Modality {modality})")
    if PIXEL_DATA not in ds:
        return Problem("no_pixels", "DICOM without pixel data")
    if sop.startswith(SECONDARY_CAPTURE_PREFIX):  # before geometry: SC objects often lack it
        return Problem("derived", "derived or secondary capture (secondary capture SOP class)")
    required = ["SeriesInstanceUID", "Rows", "Columns"]
    if is_multiframe(ds):
        missing = [t for t in required if t not in ds] + _multiframe_geometry_missing(ds)
    else:
        required += ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"]
        missing = [t for t in required if t not in ds]
    if missing:
        return Problem("no_pixels", f"DICOM without image geometry (missing {', '.join(missing)})")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        colour = str(ds.get("PhotometricInterpretation", "") or "colour")
        return Problem(
            "unsupported", f"unsupported DICOM: colour image ({colour}, {samples} samples per "
            "pixel); only greyscale volumes are converted",
        )  # fmt: skip
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if mosaic.is_mosaic(ds):  # Siemens packs a whole volume into one tiled plane
        info = mosaic.mosaic_info(ds)
        if "error" in info:
            return Problem("unsupported", f"unsupported DICOM: {info['error']}")
    if mosaic.is_uih_mosaic(ds):
        return Problem(
            "unsupported", "unsupported DICOM: UIH mosaic (ImageType VFRAME: the slices are "
            "tiles of one plane, their positions in a private sequence); not converted",
        )  # fmt: skip
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        return Problem("localizer", f"localizer (ImageType {'/'.join(image_type)})")
    if image_type and (image_type[0] == "DERIVED" or "SECONDARY" in image_type[1:2]):
        return Problem("derived", f"derived or secondary capture (ImageType {image_type[0]})")
    if str(ds.get("BurnedInAnnotation", "NO")).upper() == "YES":
        return Problem("burned_in", "burned-in annotation (BurnedInAnnotation YES)")
    return None


# ----------------------------------------------------------------------------- grouping


def _frame_geometry(ds: pydicom.Dataset, i: int) -> dict[str, Any]:
    """Geometry and rescale of frame ``i`` of an enhanced object (per-frame wins over shared)."""
    import pydicom

    shared = (ds.get("SharedFunctionalGroupsSequence") or [pydicom.Dataset()])[0]
    frames = ds.get("PerFrameFunctionalGroupsSequence") or []
    frame = frames[i] if i < len(frames) else pydicom.Dataset()
    out: dict[str, Any] = {}
    for seq, attrs in (
        ("PlanePositionSequence", ("ImagePositionPatient",)),
        ("PlaneOrientationSequence", ("ImageOrientationPatient",)),
        ("PixelMeasuresSequence", ("PixelSpacing", "SliceThickness")),
        ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")),
        ("FrameContentSequence", ("TemporalPositionIndex", "StackID", "DimensionIndexValues")),
        ("MREchoSequence", ("EffectiveEchoTime",)),
        ("MRDiffusionSequence", ("DiffusionBValue",)),
    ):
        for group in (shared, frame):
            if seq in group and len(group[seq].value):
                item = group[seq][0]
                for attr in attrs:
                    if attr in item:
                        out[attr] = item[attr].value
    if "EffectiveEchoTime" in out:
        out["EchoTime"] = out.pop("EffectiveEchoTime")
    diffusion = frame.get("MRDiffusionSequence") or shared.get("MRDiffusionSequence") or []
    if len(diffusion) and "DiffusionGradientDirectionSequence" in diffusion[0]:
        direction = diffusion[0].DiffusionGradientDirectionSequence
        if len(direction) and "DiffusionGradientOrientation" in direction[0]:
            out["DiffusionGradientOrientation"] = direction[0].DiffusionGradientOrientation
    return out


def expand_frames(s: Slice) -> list[Slice]:
    """One Slice per frame of an enhanced multi-frame object, per tile of a mosaic; the slice
    itself otherwise."""
    if s.frame is not None or s.tile is not None:
        return [s]
    if s.header.get("_mosaic"):
        return [Slice(s.path, s.header, None, g, i) for i, g in
                enumerate(mosaic.tile_geometry(s.header))]  # fmt: skip
    frames = s.header.get("_frames")
    if not frames:
        return [s]
    return [Slice(s.path, s.header, i, g) for i, g in enumerate(frames)]


def group_series(slices: list[Slice]) -> list[Series]:
    """Group by SeriesInstanceUID, split by orientation and matrix size, then into volumes.

    A group whose positions repeat is split into volumes by :func:`volumes.split_volumes`
    (container, header keys, instance order); where that is not certain, the group becomes one
    Series with ``problem`` set: it is quarantined with the reason, never converted. CT
    scanners that number every slice as its own acquisition are not torn apart: keys are tried
    only where positions repeat.
    """
    groups: dict[tuple, list[Slice]] = {}
    orientations: dict[str, list[np.ndarray]] = defaultdict(list)
    for s in (f for s0 in slices for f in expand_frames(s0)):
        # SeriesNumber too, as dcm2niix: exports that reuse one UID for several series exist
        uid = str(s.header.SeriesInstanceUID)
        number = s.header.get("SeriesNumber")
        uid = uid if number is None else f"{uid}\0{number}"
        iop = s.orientation
        reps = orientations[uid]
        idx = next((i for i, r in enumerate(reps) if np.max(np.abs(r - iop)) < 1e-3), None)
        if idx is None:
            reps.append(iop)
            idx = len(reps) - 1
        key = (uid, idx, *s.matrix)
        groups.setdefault(key, []).append(s)

    out: list[Series] = []
    for (uid_number, idx, rows, cols), members in groups.items():
        uid, _, number = uid_number.partition("\0")
        n_numbers = len({k[0] for k in groups if k[0].partition("\0")[0] == uid})
        base = uid if n_numbers == 1 else f"{uid}#s{number}"
        n_split = sum(1 for k in groups if k[0] == uid_number)
        base = base if n_split == 1 else f"{base}#o{idx}-{rows}x{cols}"
        out.extend(_split_4d(base, members))
    return out


def _split_4d(uid: str, members: list[Slice]) -> list[Series]:
    try:
        found = volumes.split_volumes(members)
    except Unresolved as exc:
        return [Series(uid, members, problem=Problem("unresolved_4d", str(exc)))]
    if len(found) == 1 and found[0].label is None:
        return [Series(uid, found[0].planes)]
    return [
        Series(
            f"{uid}#{v.label}", v.planes, split_by=v.split_by, keys=v.keys, n_volumes=len(found)
        )  # fmt: skip
        for v in found
    ]


# ----------------------------------------------------------------------------- checks


def slice_normal(orientation: np.ndarray) -> np.ndarray:
    """Unit normal of the slice plane. ImageOrientationPatient is stored rounded (often to 6
    decimals), so the raw cross product is a little short of unit length."""
    normal = np.cross(orientation[:3], orientation[3:])
    return normal / max(float(np.linalg.norm(normal)), 1e-12)


def sort_slices(series: Series) -> np.ndarray:
    """Sort slices along the normal in place; return their positions along it (mm)."""
    normal = slice_normal(series.slices[0].orientation)
    series.slices.sort(key=lambda s: float(s.position @ normal))
    return np.array([float(s.position @ normal) for s in series.slices])


def check_series(
    series: Series,
    min_slices: int = 2,
    gap_factor: float = 1.5,
    max_tilt_deg: float = 0.05,
) -> list[Problem]:
    """Sort the series and list what is wrong with it, most fundamental first."""
    n = len(series.slices)
    if n < min_slices:
        reason = (
            "single-slice series"
            if n == 1
            else f"series has {n} slices, fewer than min_slices={min_slices}"
        )
        return [Problem("single_slice", reason)]
    pos = sort_slices(series)
    if n < 2:
        return []
    problems: list[Problem] = []
    gaps = np.diff(pos)
    if np.any(gaps < 1e-3):
        i = int(np.argmin(gaps))
        problems.append(
            Problem(
                "duplicate_position",
                f"duplicate slice position {pos[i]:.2f} mm (slices {i} and {i + 1} of {n}: "
                f"{series.slices[i].path.name}, {series.slices[i + 1].path.name})",
            )
        )
        return problems
    median = float(np.median(gaps))
    if np.any(gaps > gap_factor * median) or np.any(gaps < median / gap_factor):
        i = int(np.argmax(np.abs(gaps - median)))
        problems.append(
            Problem(
                "missing_slice",
                f"missing slice: gap {gaps[i]:.2f} mm after slice {i} of {n} "
                f"(median spacing {median:.2f} mm)",
            )
        )
    normal = slice_normal(series.slices[0].orientation)
    step = series.slices[-1].position - series.slices[0].position
    # atan2 of the across / along components: exact near 0, where arccos of a cosine is not
    tilt = float(
        np.degrees(np.arctan2(np.linalg.norm(np.cross(step, normal)), abs(float(step @ normal))))
    )
    if tilt > max_tilt_deg:
        problems.append(
            Problem("gantry_tilt", f"gantry tilt {tilt:.2f} deg: slices are sheared, not stacked")
        )
    return problems


def sort_and_check(
    series: Series, min_slices: int = 2, gap_factor: float = 1.5, max_tilt_deg: float = 0.05
) -> np.ndarray:
    """Sort slices along the normal in place; return the positions along it.

    Raises SeriesError for too few slices, duplicate positions, a gap over ``gap_factor`` x the
    median, or gantry tilt over ``max_tilt_deg``. (Ingestion and prediction decide through
    :class:`medml.ingest.checks.SeriesChecks`, which applies the policies as well.)
    """
    problems = check_series(series, min_slices, gap_factor, max_tilt_deg)
    if problems:
        raise SeriesError(problems[0].reason, problems[0].case)
    return np.array([float(s.position @ slice_normal(s.orientation)) for s in series.slices])


# ----------------------------------------------------------------------------- pixels


def _native_frames(header: Header, blob: bytes) -> np.ndarray | None:
    """Stored values of every frame, ``(frames, rows, cols)``, read straight from the file
    bytes where the layout allows it (native little endian, greyscale, 8 or 16 bits)."""
    start = header.get("_pixel_tell")
    if (
        header.get("TransferSyntaxUID") not in NATIVE_LE
        or start is None
        or int(header.get("SamplesPerPixel", 1)) != 1
        or int(header.BitsAllocated) not in (8, 16)
    ):
        return None
    signed = int(header.get("PixelRepresentation", 0)) == 1
    bits = int(header.BitsAllocated)
    rows, cols = int(header.Rows), int(header.Columns)
    frames = max(int(header.get("NumberOfFrames", 1) or 1), 1)
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    n = frames * rows * cols * dtype.itemsize
    if start + n > len(blob):
        raise SeriesError("unreadable DICOM: pixel data shorter than Rows x Columns", "unreadable")
    words = np.frombuffer(blob, dtype, count=frames * rows * cols, offset=start)
    return stored_values(words.reshape(frames, rows, cols), header)


def stored_values(words: np.ndarray, header: Header) -> np.ndarray:
    """The values of raw pixel words: bits above BitsStored dropped, signed values extended
    from their top stored bit (PS3.5 8.1.1: bits outside BitsStored are not part of the value,
    an overlay or garbage). Returns ``words`` itself (no copy) where all bits are stored."""
    bits = words.dtype.itemsize * 8
    stored = int(header.get("BitsStored", bits) or bits)
    high_bit = header.get("HighBit")
    high = int(high_bit) if high_bit is not None else stored - 1
    if stored >= bits and high == bits - 1:
        return words
    shift = max(high + 1 - stored, 0)
    unsigned = words.view(f"<u{bits // 8}")
    values = (unsigned >> shift) & ((1 << stored) - 1) if shift else unsigned & ((1 << stored) - 1)
    if words.dtype.kind != "i":
        return values.astype(words.dtype, copy=False)
    sign = 1 << (stored - 1)
    wide = values.astype(np.int32)
    wide -= (wide & sign) << 1  # two's complement at the top stored bit
    return wide.astype(words.dtype)


def _decoded_frames(blob: bytes) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(blob))
    arr = ds.pixel_array
    return arr if arr.ndim == 3 and int(ds.get("NumberOfFrames", 1) or 1) > 1 else arr[None]


def _value_range(s: Slice, slope: float, intercept: float) -> tuple[float, float]:
    """The range a plane can take after rescale, from BitsStored and PixelRepresentation."""
    h = s.header
    bits = int(h.get("BitsStored", h.get("BitsAllocated", 16)) or 16)
    signed = int(h.get("PixelRepresentation", 0) or 0) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    ends = (lo * slope + intercept, hi * slope + intercept)
    return min(ends), max(ends)


def _file_planes(s: Slice, blob: bytes) -> np.ndarray:
    """Stored values of every frame of ``s``'s file, ``(frames, rows, cols)``: a view into the
    file bytes where the layout allows, pydicom's decoder otherwise."""
    inflated = s.header.get("_inflated_size")
    if inflated is not None:  # a deflated file: the bytes its header was read from
        blob = inflated_equivalent(blob, budget.MAX_VOXELS, expected=inflated)
    frames = _native_frames(s.header, blob)
    return frames if frames is not None else _decoded_frames(blob)


def _plane(s: Slice, frames: np.ndarray) -> np.ndarray:
    if s.tile is not None:
        return mosaic.cut_tile(frames[0], s.header["_mosaic"]["n"], s.tile)
    return frames[s.frame or 0]


def _iter_planes(series: Series, blobs: dict[Path, bytes]) -> Iterator[np.ndarray]:
    """Stored values of every slice in order, each file read once: views into the file bytes
    where the layout allows. A file holding one slice is read, used and let go (a 512^2 CT
    series is never held twice in memory, and its buffers are reused); frames and mosaic tiles
    keep their file until the series is done."""
    by_file: dict[Path, np.ndarray] = {}
    shape = None
    for s in series.slices:
        many = s.frame is not None or s.tile is not None
        frames = by_file.get(s.path)
        if frames is None:
            blob = blobs[s.path] if s.path in blobs else s.path.read_bytes()
            frames = _file_planes(s, blob)
            if many:
                by_file[s.path] = frames
        plane = _plane(s, frames)
        if shape is None:
            shape = plane.shape
        elif plane.shape != shape:
            raise SeriesError("internal check: planes of different matrix size in one volume")
        yield plane


def _output_type(
    series: Series,
    rescales: list[tuple[float, float]],
    planes: list[np.ndarray] | None = None,
) -> tuple[type, type] | None:
    """(output dtype, working dtype) of the rescaled values: int16 when every slope and
    intercept is whole and the values fit, int32 when whole but wider, float32 otherwise.
    ``None`` where the bit depth allows more than int16 and the values must be looked at
    (``planes``, when given, are)."""
    if not all(float(a).is_integer() and float(b).is_integer() for a, b in rescales):
        return np.float32, np.float32
    ranges = [_value_range(s, a, b) for s, (a, b) in zip(series.slices, rescales)]
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    if not (lo >= -(2**15) and hi < 2**15):  # the bit depth allows more: look at the values
        if planes is None:
            return None
        ends = [
            (float(p.min()) * a + b, float(p.max()) * a + b) for p, (a, b) in zip(planes, rescales)
        ]
        lo, hi = min(min(e) for e in ends), max(max(e) for e in ends)
    return (np.int16 if lo >= -(2**15) and hi < 2**15 else np.int32), np.int32


def load_volume(
    series: Series, blobs: dict[Path, bytes] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Stack the (sorted) slices into ``(col, row, slice)`` data in real units and a RAS affine.

    ``blobs`` holds already-read file bytes (the caller hashed them); missing ones are read.
    The output is int16 when every slope and intercept is whole and the values fit (CT),
    int32 when whole but wider, float32 otherwise. One pass writes the output array, reading
    each file as it goes where the headers alone decide the type.
    """
    blobs = dict(blobs or {})
    rescales = [s.rescale for s in series.slices]
    types = _output_type(series, rescales)
    if types is None:
        planes: Iterable[np.ndarray] = list(_iter_planes(series, blobs))
        types = _output_type(series, rescales, planes)
    else:
        planes = _iter_planes(series, blobs)
    dtype, work = types
    out = None
    for k, (plane, (slope, intercept)) in enumerate(zip(planes, rescales)):
        if out is None:
            out = np.empty((len(rescales), *plane.shape), dtype)
        if slope == 1:
            np.add(plane, work(intercept), out=out[k], dtype=work, casting="unsafe")
        else:
            tmp = np.multiply(plane, work(slope), dtype=work)
            tmp += work(intercept)
            out[k] = tmp
    data = out.transpose(2, 1, 0)  # (col, row, slice), Fortran-contiguous view
    return data, LPS_TO_RAS @ lps_affine(series)


def lps_affine(series: Series) -> np.ndarray:
    """Voxel ``(col, row, slice)`` to LPS mm, from the first and last slice (sorted)."""
    first = series.slices[0]
    iop = first.orientation
    row_spacing, col_spacing = first.pixel_spacing
    n = len(series.slices)
    if n > 1:
        step = (series.slices[-1].position - first.position) / (n - 1)
    else:
        step = slice_normal(iop) * float(first._get("SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * col_spacing  # along a row: column index increases
    lps[:3, 1] = iop[3:] * row_spacing  # down a column: row index increases
    lps[:3, 2] = step
    lps[:3, 3] = first.position
    return lps


def pixel_digest(s: Slice, blob: bytes) -> bytes:
    """Stored pixel bytes of one plane, for telling identical duplicates from conflicting ones."""
    return np.ascontiguousarray(_plane(s, _file_planes(s, blob))).tobytes()
