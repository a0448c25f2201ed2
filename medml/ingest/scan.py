"""A fast header reader for plain native DICOM files (no pydicom), for indexing large trees.

pydicom spends ~1 ms per file building its element objects and converting values; indexing
only needs a few dozen attributes of each file. This reader walks the elements of a Part 10
file in Explicit or Implicit VR Little Endian (the syntaxes of nearly every uncompressed
export), keeps the raw bytes of the tags ingestion reads (:data:`WANTED`), seeks over
everything else (sequences included) and over the pixel data, and converts the kept values
exactly as pydicom does for the cases it accepts.

It *declines* (raises :class:`Declined`; the caller then reads the file with pydicom, as
before) wherever its result could differ from pydicom's: no preamble, another transfer syntax
(compressed, deflated, big endian), enhanced multi-frame objects (their functional-group
sequences are pydicom's), more than one frame, no pixel data, an element cut short before the
pixel data, an unknown or UN value representation on a kept tag, a kept private tag in
implicit VR (its VR would come from pydicom's private dictionary), non-ASCII text (character
sets), values pydicom would only warn about (a DS or IS that does not parse cleanly). The
result reads like the pydicom Dataset of :func:`medml.ingest.dicom.read_header` for what
classification and :func:`medml.ingest.dicom.compact_header` ask of it;
``tests/test_ingest_scan.py`` checks both give equal headers and verdicts on every file of the
validation sets and the fixtures.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Any

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
PIXEL_DATA = 0x7FE00010
HEAD_BYTES = 1 << 16  # read first; a longer header is read in steps of 4x

# Keyword -> (tag, dictionary VR) of every public attribute ingestion reads (the VRs are
# pydicom's dictionary's: a test checks them); implicit VR files take their VR from here.
PUBLIC = {
    "SpecificCharacterSet": (0x00080005, "CS"),
    "ImageType": (0x00080008, "CS"),
    "SOPClassUID": (0x00080016, "UI"),
    "SOPInstanceUID": (0x00080018, "UI"),
    "StudyDate": (0x00080020, "DA"),
    "Modality": (0x00080060, "CS"),
    "Manufacturer": (0x00080070, "LO"),
    "PatientID": (0x00100020, "LO"),
    "SliceThickness": (0x00180050, "DS"),
    "EchoTime": (0x00180081, "DS"),
    "EchoNumbers": (0x00180086, "IS"),
    "SpacingBetweenSlices": (0x00180088, "DS"),
    "TriggerTime": (0x00181060, "DS"),
    "DiffusionBValue": (0x00189087, "FD"),
    "DiffusionGradientOrientation": (0x00189089, "FD"),
    "StudyInstanceUID": (0x0020000D, "UI"),
    "SeriesInstanceUID": (0x0020000E, "UI"),
    "SeriesNumber": (0x00200011, "IS"),
    "AcquisitionNumber": (0x00200012, "IS"),
    "InstanceNumber": (0x00200013, "IS"),
    "ImagePositionPatient": (0x00200032, "DS"),
    "ImageOrientationPatient": (0x00200037, "DS"),
    "TemporalPositionIdentifier": (0x00200100, "IS"),
    "TemporalPositionIndex": (0x00209128, "UL"),
    "SamplesPerPixel": (0x00280002, "US"),
    "PhotometricInterpretation": (0x00280004, "CS"),
    "NumberOfFrames": (0x00280008, "IS"),
    "Rows": (0x00280010, "US"),
    "Columns": (0x00280011, "US"),
    "PixelSpacing": (0x00280030, "DS"),
    "BitsAllocated": (0x00280100, "US"),
    "BitsStored": (0x00280101, "US"),
    "HighBit": (0x00280102, "US"),
    "PixelRepresentation": (0x00280103, "US"),
    "BurnedInAnnotation": (0x00280301, "CS"),
    "RescaleIntercept": (0x00281052, "DS"),
    "RescaleSlope": (0x00281053, "DS"),
}
# An enhanced object's geometry is in functional-group sequences: these are read into items
# (explicit VR only), keeping the attributes below at any depth.
ENHANCED = {
    "PerFrameFunctionalGroupsSequence": (0x52009230, "SQ"),
    "SharedFunctionalGroupsSequence": (0x52009229, "SQ"),
    "DimensionIndexSequence": (0x00209222, "SQ"),
}
NESTED = {
    "PlanePositionSequence": (0x00209113, "SQ"),
    "PlaneOrientationSequence": (0x00209116, "SQ"),
    "PixelMeasuresSequence": (0x00289110, "SQ"),
    "PixelValueTransformationSequence": (0x00289145, "SQ"),
    "FrameContentSequence": (0x00209111, "SQ"),
    "MREchoSequence": (0x00189114, "SQ"),
    "MRDiffusionSequence": (0x00189117, "SQ"),
    "DiffusionGradientDirectionSequence": (0x00189076, "SQ"),
    "StackID": (0x00209056, "SH"),
    "DimensionIndexValues": (0x00209157, "UL"),
    "EffectiveEchoTime": (0x00189082, "FD"),
    "DimensionIndexPointer": (0x00209165, "AT"),
}
ENHANCED_TAGS = frozenset(t for t, _ in ENHANCED.values())
TAG_BY_KEYWORD = {k: t for k, (t, _) in (PUBLIC | ENHANCED | NESTED).items()}
TAG_BY_KEYWORD["PixelData"] = PIXEL_DATA
KEYWORDS = frozenset(TAG_BY_KEYWORD)
DICT_VR = {t: vr for t, vr in (PUBLIC | ENHANCED | NESTED).values()}
IN_ITEMS = frozenset(t for t, _ in (PUBLIC | NESTED).values())  # kept inside sequence items

LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ UC UN UR UT SV UV".split())
VRS = LONG_VRS | frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split()
)
STRING_VRS = {"CS", "DA", "TM", "DT", "AS", "UI"}  # pydicom: multi_string (whole value rstripped)
TEXT_VRS = {"SH", "LO", "UC"}  # pydicom: convert_text (each value rstripped)
SINGLE_TEXT_VRS = {"LT", "ST", "UT"}
NUMBER_FORMATS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d"}
BYTES_VRS = {"OB", "OW", "OD", "OF", "OL", "OV", "UN"}
EMPTY_TEXT = STRING_VRS | TEXT_VRS | SINGLE_TEXT_VRS | {"AE", "UR"}
DS_RE = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")
IS_RE = re.compile(r"\s*[+-]?\d+\s*")
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
_HH = struct.Struct("<HH")
_EXPLICIT = struct.Struct("<HH2sH")
_HHL = struct.Struct("<HHL")
_H = struct.Struct("<H")
_L = struct.Struct("<L")


class Declined(Exception):
    """This file is for pydicom to read (the reason is for tests and logs)."""


class Element:
    """What code written for pydicom reads of a data element: tag, VR, value, offsets."""

    __slots__ = ("tag", "VR", "value", "value_tell", "length")

    def __init__(self, tag: int, vr: str, value: Any, value_tell: int, length: int) -> None:
        self.tag, self.VR, self.value = _Tag(tag), vr, value
        self.value_tell, self.length = value_tell, length

    def __getitem__(self, index: int) -> Any:  # a sequence's item, as pydicom's element gives
        return self.value[index]


class _Tag(int):
    @property
    def group(self) -> int:
        return self >> 16

    @property
    def elem(self) -> int:
        return self & 0xFFFF


class ScannedHeader:
    """The kept elements of one file, read like a pydicom Dataset by keyword, int tag or
    ``(group, element)``: ``h.get("Rows")``, ``"PixelData" in h``, ``h[tag].value``."""

    def __init__(
        self, filename: str | None, elements: dict[int, Element], meta: dict[str, str] | None
    ) -> None:
        self.filename = filename
        self._elements = elements
        self.file_meta = meta

    def __getattr__(self, name: str) -> Any:  # ``item.DiffusionGradientDirectionSequence``
        if name in KEYWORDS:
            elements = self.__dict__.get("_elements", {})
            if TAG_BY_KEYWORD[name] in elements:
                return elements[TAG_BY_KEYWORD[name]].value
        raise AttributeError(name)

    @staticmethod
    def _tag(key: Any) -> int:
        if isinstance(key, str):
            return TAG_BY_KEYWORD[key]
        if isinstance(key, tuple):
            return (key[0] << 16) | key[1]
        return int(key)

    def __contains__(self, key: Any) -> bool:
        return self._tag(key) in self._elements

    def __getitem__(self, key: Any) -> Element:
        return self._elements[self._tag(key)]

    def __len__(self) -> int:
        return len(self._elements)

    def get(self, key: Any, default: Any = None) -> Any:
        elem = self._elements.get(self._tag(key))
        return default if elem is None else elem.value

    def get_item(self, key: Any, keep_deferred: bool = True) -> Element | None:
        return self._elements.get(self._tag(key))

    def keys(self):
        return self._elements.keys()

    def group_dataset(self, group: int) -> list[Element]:
        return [e for t, e in sorted(self._elements.items()) if t >> 16 == group]


def convert(vr: str, raw: bytes) -> Any:
    """A value as pydicom converts it (single value, or a list for several), or Declined."""
    if not raw:
        return "" if vr in EMPTY_TEXT else None
    if vr in BYTES_VRS:
        return raw
    fmt = NUMBER_FORMATS.get(vr)
    if fmt is not None:
        size = struct.calcsize("<" + fmt)
        if len(raw) % size:
            raise Declined(f"{vr} value of {len(raw)} bytes")
        values = list(struct.unpack(f"<{len(raw) // size}{fmt}", raw))
        return values[0] if len(values) == 1 else values
    if vr == "AT":  # pydicom: a tag as an int, (group, element) in that order
        if len(raw) % 4:
            raise Declined("AT value not of whole tags")
        words = struct.unpack(f"<{len(raw) // 2}H", raw)
        tags = [(words[i] << 16) | words[i + 1] for i in range(0, len(words), 2)]
        return tags[0] if len(tags) == 1 else tags
    if not raw.isascii() or b"\x1b" in raw:  # character sets: pydicom's decoding
        raise Declined("non-ASCII text")
    text = raw.decode("ascii")
    if vr in STRING_VRS:
        items = text.rstrip(" \x00").split("\\")
    elif vr in TEXT_VRS:
        items = [v.rstrip("\x00 ") for v in text.split("\\")]
    elif vr in SINGLE_TEXT_VRS:
        return text.rstrip("\x00 ")
    elif vr == "DS":
        items = text.rstrip(" \x00").split("\\")
        if not all(DS_RE.fullmatch(v) for v in items):
            raise Declined("DS value pydicom would warn about")
        items = [float(v) for v in items]
    elif vr == "IS":
        items = text.rstrip(" \x00").split("\\")
        if not all(IS_RE.fullmatch(v) for v in items):
            raise Declined("IS value pydicom would warn about")
        items = [int(v) for v in items]
    else:
        raise Declined(f"VR {vr} of a kept tag")
    return items[0] if len(items) == 1 else items


class _Reader:
    """Element headers of one buffer; every oddity is :class:`Declined`."""

    def __init__(self, buf: bytes) -> None:
        self.buf = buf

    def header(self, pos: int, implicit: bool) -> tuple[int, str | None, int, int]:
        """``(tag, VR or None, length, value offset)`` of the element at ``pos``."""
        buf = self.buf
        if pos + 8 > len(buf):
            raise Declined("element header cut short")
        group, elem = _HH.unpack_from(buf, pos)
        tag = (group << 16) | elem
        if implicit or group == 0xFFFE:
            return tag, None, _L.unpack_from(buf, pos + 4)[0], pos + 8
        vr = buf[pos + 4 : pos + 6]
        if vr not in VRS:
            raise Declined("unknown VR")
        if vr in LONG_VRS:
            if pos + 12 > len(buf):
                raise Declined("element header cut short")
            return tag, vr.decode(), _L.unpack_from(buf, pos + 8)[0], pos + 12
        return tag, vr.decode(), _H.unpack_from(buf, pos + 6)[0], pos + 8

    def items(self, pos: int, length: int) -> tuple[list[ScannedHeader], int]:
        """The items of the explicit-VR sequence whose value starts at ``pos``, and its end."""
        out: list[ScannedHeader] = []
        end = None if length == UNDEFINED else pos + length
        if end is not None and end > len(self.buf):
            raise Declined("sequence cut short")
        while end is None or pos < end:
            tag, _, item_length, pos = self.header(pos, True)
            if tag == SEQUENCE_END and end is None:
                return out, pos
            if tag != ITEM:
                raise Declined("malformed sequence")
            item_end = None if item_length == UNDEFINED else pos + item_length
            elements: dict[int, Element] = {}
            while item_end is None or pos < item_end:
                tag, vr, n, start = self.header(pos, False)
                if tag == ITEM_END and item_end is None:
                    pos = start
                    break
                if tag >> 16 == 0xFFFE or vr is None:
                    raise Declined("malformed item")
                if tag in IN_ITEMS and vr in ("UN", "SQ") and DICT_VR[tag] != vr:
                    raise Declined(f"{vr} value representation of a kept tag")
                if vr == "SQ":
                    if tag in IN_ITEMS:
                        value, pos = self.items(start, n)
                        elements[tag] = Element(tag, vr, value, start, n)
                    elif n == UNDEFINED:
                        pos = self.skip_sequence(start, False)
                    else:
                        pos = start + n
                    continue
                if n == UNDEFINED:
                    if vr != "UN":
                        raise Declined(f"undefined length {vr}")
                    pos = self.skip_sequence(start, True)
                    continue
                if start + n > len(self.buf):
                    raise Declined("item element cut short")
                if tag in IN_ITEMS:
                    elements[tag] = Element(tag, vr, convert(vr, self.buf[start : start + n]),
                                            start, n)  # fmt: skip
                pos = start + n
            if item_end is not None and pos != item_end:
                raise Declined("item length does not match its elements")
            out.append(ScannedHeader(None, elements, None))
        if pos != end:
            raise Declined("sequence length does not match its items")
        return out, pos

    def skip_sequence(self, pos: int, implicit: bool) -> int:
        """Past the items of an undefined-length sequence (or UN) at ``pos``."""
        while True:
            tag, _, length, pos = self.header(pos, True)
            if tag == SEQUENCE_END:
                return pos
            if tag != ITEM:
                raise Declined("malformed sequence")
            if length != UNDEFINED:
                pos += length
                continue
            while True:  # an undefined-length item: its elements up to the item end
                tag, vr, length, pos = self.header(pos, implicit)
                if tag == ITEM_END:
                    break
                if length == UNDEFINED:
                    pos = self.skip_sequence(pos, implicit or vr == "UN")
                else:
                    pos += length
            if pos > len(self.buf):
                raise Declined("sequence cut short")


def read(path: Path) -> ScannedHeader:
    """The kept elements of ``path`` (see the module docstring), or raise :class:`Declined`."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        n = HEAD_BYTES
        while True:  # a longer header (enhanced objects): 4x more, never the pixels first
            fh.seek(0)
            buf = fh.read(n)
            try:
                return _parse(str(path), buf, size)
            except _NeedMore:
                if len(buf) >= size:
                    raise Declined("file changed while read") from None
                n *= 4


class _NeedMore(Exception):
    pass


PRIVATE = {
    (0x2001, 0x1008), (0x2005, 0x1413), (0x2001, 0x1003), (0x0019, 0x100C), (0x0019, 0x100E),
    (0x0043, 0x1039), (0x0029, 0x1010), (0x0019, 0x100A),
}  # fmt: skip
PRIVATE_TAGS = {(g << 16) | e for g, e in PRIVATE}
CREATOR_TAGS = {(g << 16) | (e >> 8) for g, e in PRIVATE}
KEPT = {t for t, _ in PUBLIC.values()} | PRIVATE_TAGS | CREATOR_TAGS
SPECIAL = frozenset(KEPT | ENHANCED_TAGS | {PIXEL_DATA})  # elements the loop stops at


def _parse(filename: str, buf: bytes, size: int) -> ScannedHeader:
    complete = len(buf) == size
    if len(buf) < 132 or buf[128:132] != b"DICM":
        raise Declined("no DICOM preamble")
    meta: dict[str, str] = {}
    pos = 132
    r = _Reader(buf)
    while True:  # the file meta group: always explicit VR little endian
        if pos + 8 > len(buf):
            raise Declined("file meta cut short") if complete else _NeedMore()
        if _H.unpack_from(buf, pos)[0] != 0x0002:
            break
        tag, vr, length, start = r.header(pos, False)
        if length == UNDEFINED or start + length > len(buf):
            raise Declined("file meta cut short") if complete else _NeedMore()
        if tag in (0x00020002, 0x00020010):
            value = convert(vr or "UI", buf[start : start + length])
            if not isinstance(value, str):
                raise Declined("multi-valued UID in file meta")
            meta["MediaStorageSOPClassUID" if tag == 0x00020002 else "TransferSyntaxUID"] = value
        pos = start + length
    syntax = meta.get("TransferSyntaxUID")
    if syntax not in (EXPLICIT_LE, IMPLICIT_LE):
        raise Declined(f"transfer syntax {syntax}")
    implicit = syntax == IMPLICIT_LE
    if implicit and buf[pos + 4 : pos + 6] in VRS:
        raise Declined("implicit VR file whose first element reads as explicit")
    if not implicit and buf[pos + 4 : pos + 6] not in VRS:
        raise Declined("explicit VR file whose first element reads as implicit")
    elements: dict[int, Element] = {}
    blen = len(buf)
    while pos < size:
        if pos + 12 <= blen:  # the common element (not kept, defined length): seek over it
            if implicit:
                group, elem, length = _HHL.unpack_from(buf, pos)
                start = pos + 8
            else:
                group, elem, vr_bytes, length = _EXPLICIT.unpack_from(buf, pos)
                if vr_bytes in LONG_VRS:
                    length = _L.unpack_from(buf, pos + 8)[0]
                    start = pos + 12
                elif vr_bytes in VRS:
                    start = pos + 8
                else:
                    raise Declined("unknown VR")
            tag = group << 16 | elem
            if length != UNDEFINED and group != 0xFFFE and tag not in SPECIAL:
                pos = start + length
                continue
            if group == 0xFFFE:
                raise Declined("item tag outside a sequence")
            vr = None if implicit else vr_bytes.decode()
        else:  # the last bytes of the buffer
            if pos + 8 > blen and not complete:
                raise _NeedMore()
            if pos + 8 > size:
                raise Declined("trailing bytes after the last element")
            try:
                tag, vr, length, start = r.header(pos, implicit)
            except Declined:
                if not complete:
                    raise _NeedMore() from None
                raise
        if tag in ENHANCED_TAGS:
            if implicit or vr != "SQ":
                raise Declined("enhanced object in implicit VR (or its sequence not SQ)")
            try:
                value, pos = r.items(start, length)
            except Declined:
                if not complete:  # (most likely) the buffer ends inside the sequence
                    raise _NeedMore() from None
                raise
            elements[tag] = Element(tag, vr, value, start, length)
            continue
        if tag >> 16 == 0xFFFE:
            raise Declined("item tag outside a sequence")
        if tag == PIXEL_DATA:
            if length == UNDEFINED:
                raise Declined("encapsulated pixel data")
            elements[tag] = Element(tag, vr or "OW", None, start, length)
            if start + length >= size:
                break  # the usual end (or a file cut short: classification says so)
            if not complete:
                raise _NeedMore()  # elements after the pixels: read like the rest
            pos = start + length
            continue
        if length == UNDEFINED:
            if not (vr is None or vr in ("SQ", "UN")):
                raise Declined(f"undefined length {vr}")
            try:
                pos = r.skip_sequence(start, implicit or vr == "UN")
            except Declined:
                if not complete:
                    raise _NeedMore() from None
                raise
            if tag in KEPT:
                raise Declined("kept tag as a sequence")
            continue
        end = start + length
        if end > len(buf):
            if not complete:
                raise _NeedMore()
            raise Declined("element cut short")
        if tag in KEPT:
            if implicit:
                if tag not in DICT_VR:
                    raise Declined("private tag in implicit VR")
                vr = DICT_VR[tag]
            elif vr in ("UN", "SQ"):
                raise Declined(f"{vr} value representation of a kept tag")
            elements[tag] = Element(tag, vr, convert(vr, buf[start:end]), start, length)
        pos = end
    if PIXEL_DATA not in elements:
        raise Declined("no pixel data")
    return ScannedHeader(filename, elements, meta)
