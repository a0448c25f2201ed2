"""The fast header reader (medml.ingest.scan) against pydicom: equal headers, equal verdicts.

Indexing reads a file with :mod:`medml.ingest.scan` unless it declines, and with pydicom
otherwise; both must give the same compact header (every value conversion and grouping use)
and the same classification. Checked on every file of dcm2niix's validation sets (classic,
mosaic with CSA header, enhanced multi-frame; skipped where absent) and on pydicom-written
fixtures; declining is checked on the cases the reader leaves to pydicom.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import ImplicitVRLittleEndian, RLELossless
from pydicom.values import convert_value

from medml.ingest import dicom, mosaic, scan
from medml.ingest.fixtures import (
    SeriesSpec,
    phantom,
    write_classic_4d,
    write_deflated,
    write_enhanced,
    write_enhanced_4d,
    write_mosaic,
    write_series,
)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "dicom"


def _same(path: Path) -> bool:
    """Whether the reader accepted ``path``; where it did, its result equals pydicom's."""
    try:
        fast = scan.read(path)
    except scan.Declined:
        return False
    slow = dicom.read_header(path)
    assert dicom.classify(fast) == dicom.classify(slow), path
    assert dicom.compact_header(fast) == dicom.compact_header(slow), path
    return True


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/dicom is absent")
def test_validation_sets_read_the_same():
    files = sorted(p for p in SHARED.rglob("*") if p.is_file())
    accepted = [p for p in files if _same(p)]
    # most of the sets are native explicit VR (classic, mosaics, enhanced): if the reader
    # declined them all, indexing would silently be as slow as before
    assert len(accepted) >= 0.9 * len([p for p in files if p.suffix.lower() in (".dcm", ".img")])
    assert any("dcm_qa_enh" in str(p) for p in accepted)  # enhanced objects
    assert any("mosaic" in str(p) for p in accepted)  # CSA headers


def _fixtures(root: Path) -> list[Path]:
    paths = []
    stored = phantom(4, 12, 10, seed=3)
    paths += write_series(SeriesSpec(stored), root / "ct")
    paths += write_series(SeriesSpec(stored, transfer_syntax=ImplicitVRLittleEndian), root / "imp")
    signed = phantom(4, 12, 10, seed=4, signed=True)
    paths += write_series(
        SeriesSpec(signed, signed=True, extra={"BitsStored": 12, "HighBit": 11}), root / "s12"
    )
    paths += write_series(
        SeriesSpec(stored, extra={"BurnedInAnnotation": "YES", "ImageType": ["DERIVED"]}),
        root / "derived",
    )
    paths += write_series(SeriesSpec(stored, modality="SR"), root / "sr")
    paths.append(write_enhanced(SeriesSpec(stored, modality="MR"), root / "enh" / "e.dcm"))
    paths.append(write_enhanced_4d(SeriesSpec(stored, modality="MR"), root / "e4" / "a.dcm", 3))
    paths.append(
        write_enhanced_4d(SeriesSpec(stored, modality="MR"), root / "e5" / "a.dcm", 2, False)
    )
    spec = SeriesSpec(stored, modality="MR", extra={"Manufacturer": "Philips Medical Systems"})
    vols = [{(0x2001, 0x1008): ("IS", v + 1), (0x2005, 0x1413): ("IS", 2 - v)} for v in range(2)]
    paths += write_classic_4d(spec, root / "philips", vols)
    ge = SeriesSpec(stored, modality="MR", extra={"Manufacturer": "GE MEDICAL SYSTEMS"})
    paths += write_classic_4d(ge, root / "ge", [{(0x0043, 0x1039): ("IS", [b, 0, 0, 0])}
                                                for b in (0, 1000)])  # fmt: skip
    paths += write_classic_4d(
        SeriesSpec(stored, modality="MR"),
        root / "dwi",
        [{"DiffusionBValue": b, "DiffusionGradientOrientation": [0.0, 0.6, 0.8]} for b in (0, 500)],
    )
    paths += write_mosaic(SeriesSpec(phantom(5, 8, 8, seed=5), modality="MR"), root / "mos", 2)
    return paths


@pytest.mark.parametrize("head_bytes", [scan.HEAD_BYTES, 200])
def test_fixtures_read_the_same(tmp_path, monkeypatch, head_bytes):
    # 200: every header is longer than the first read, so it is read again in larger steps
    monkeypatch.setattr(scan, "HEAD_BYTES", head_bytes)
    paths = _fixtures(tmp_path)
    accepted = [p for p in paths if _same(p)]
    assert len(accepted) == len(paths)  # all of them are native little endian, ASCII


def test_declines_what_pydicom_must_read(tmp_path):
    stored = phantom(2, 8, 8, seed=1)
    deflated = write_deflated(SeriesSpec(stored), tmp_path / "defl")[0]
    rle = write_series(SeriesSpec(stored, transfer_syntax=RLELossless), tmp_path / "rle")[0]
    latin = write_series(
        SeriesSpec(stored, extra={"SpecificCharacterSet": "ISO_IR 100", "Manufacturer": "Müller"}),
        tmp_path / "latin",
    )[0]
    implicit_private = write_classic_4d(
        SeriesSpec(stored, transfer_syntax=ImplicitVRLittleEndian,
                   extra={"Manufacturer": "Philips"}),
        tmp_path / "ip", [{(0x2001, 0x1008): ("IS", 1)}],
    )[0]  # fmt: skip
    plain = write_series(SeriesSpec(stored), tmp_path / "plain")[0]
    no_pixels = tmp_path / "nopix.dcm"
    ds = pydicom.dcmread(plain)
    del ds.PixelData
    ds.save_as(no_pixels)
    header_cut = tmp_path / "cut_header.dcm"
    header_cut.write_bytes(plain.read_bytes()[:300])
    for path in (deflated, rle, latin, implicit_private, no_pixels, header_cut):
        with pytest.raises(scan.Declined):
            scan.read(path)
    notes = tmp_path / "notes.txt"
    notes.write_text("not DICOM")
    with pytest.raises(scan.Declined):
        scan.read(notes)
    # a file cut inside its pixel data is read, and classified as truncated like pydicom's
    pixels_cut = tmp_path / "cut_pixels.dcm"
    pixels_cut.write_bytes(plain.read_bytes()[:-10])
    assert _same(pixels_cut)
    problem = dicom.classify(scan.read(pixels_cut))
    assert problem is not None and problem.reason.startswith("unreadable DICOM: truncated")


@pytest.mark.parametrize(
    ("vr", "raw"),
    [
        ("DS", b"1.5 "), ("DS", b"-0.25\\2\\3e2 "), ("DS", b" 7"), ("DS", b"1."),
        ("IS", b"12 "), ("IS", b"+3\\-4"), ("IS", b"007"),
        ("CS", b"ORIGINAL\\PRIMARY\\M\\ND "), ("CS", b"MR"), ("CS", b"A\\\\B"), ("CS", b" X "),
        ("UI", b"1.2.840.10008.5.1.4.1.1.4\x00"), ("DA", b"20240131"), ("TM", b"101010.5 "),
        ("LO", b"SIEMENS "), ("LO", b" GE\\x \x00"), ("SH", b"1\\2 "), ("LT", b"a\\b  "),
        ("US", struct.pack("<H", 512)), ("US", struct.pack("<3H", 1, 2, 3)),
        ("SS", struct.pack("<h", -5)), ("UL", struct.pack("<2L", 7, 9)),
        ("SL", struct.pack("<l", -9)), ("FD", struct.pack("<3d", 0.1, -0.2, 1e-9)),
        ("FL", struct.pack("<f", 0.1)), ("AT", struct.pack("<HH", 0x0020, 0x9056)),
        ("AT", struct.pack("<4H", 0x0020, 0x9056, 0x0020, 0x9057)), ("OB", b"\x01\x02"),
        ("DS", b""), ("IS", b""), ("CS", b""), ("US", b""), ("OB", b""), ("UI", b""),
    ],
)  # fmt: skip
def test_values_convert_as_pydicom_does(vr, raw):
    raw_elem = RawDataElement(Tag(0x00100010), vr, len(raw), raw, 0, False, True)
    expected = convert_value(vr, raw_elem)
    got = scan.convert(vr, raw)
    assert dicom._plain(got) == dicom._plain(expected) if raw else got == expected


DECLINED_VALUES = [
    ("DS", b"1,5"), ("IS", b"1.0"), ("DS", b"nan"), ("LO", "Müller".encode("latin-1")),
    ("PN", b"DOE^J"),
]  # fmt: skip


@pytest.mark.parametrize(("vr", "raw"), DECLINED_VALUES)
def test_values_pydicom_would_warn_about_are_declined(vr, raw):
    with pytest.raises(scan.Declined):
        scan.convert(vr, raw)


def test_tables_match_pydicom_and_the_indexer():
    for keyword, (tag, vr) in (scan.PUBLIC | scan.ENHANCED | scan.NESTED).items():
        assert tag_for_keyword(keyword) == tag and dictionary_VR(tag) == vr, keyword
    read = {k for k in dicom.TAGS_READ if isinstance(k, str)} - {"PixelData"}
    assert read <= set(scan.PUBLIC) | set(scan.ENHANCED)
    private = {tag for _, tag in dicom.PRIVATE_KEYS.values()}
    private |= {mosaic.CSA_IMAGE_HEADER, mosaic.SIEMENS_N_MOSAIC}
    assert private == scan.PRIVATE


def test_native_frames_equal_pydicom_decoding(tmp_path):
    stored = phantom(4, 12, 10, seed=2)
    enhanced = write_enhanced_4d(SeriesSpec(stored, modality="MR"), tmp_path / "a.dcm", 3)
    twelve = write_series(
        SeriesSpec(stored | 0xF000, extra={"BitsStored": 12, "HighBit": 11}), tmp_path / "t"
    )[0]
    for path in (enhanced, twelve):
        header = dicom.compact_header(scan.read(path))
        blob = path.read_bytes()
        ours = dicom._native_frames(header, blob)
        theirs = dicom._decoded_frames(blob)
        assert ours is not None and np.array_equal(ours, theirs)
