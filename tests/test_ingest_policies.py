"""Ingest policies, the bad-input corpus, de-identification and labels (docs/ingestion.md)."""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

from medml.catalog import Catalog
from medml.config import IngestConfig
from medml.ingest import ingest
from medml.ingest.fixtures import SeriesSpec, phantom, write_series
from medml.workspace import Workspace


def _report(ws: Workspace) -> dict:
    return json.loads(sorted(ws.reports.glob("ingest-*.json"))[-1].read_text())


def _files(ws: Workspace) -> dict[str, dict]:
    return {f["path"]: f for f in _report(ws)["files"]}


def _series(folder, n=5, rows=20, cols=16, seed=0, **kw) -> SeriesSpec:
    spec = SeriesSpec(phantom(n, rows, cols, seed=seed), **kw)
    write_series(spec, folder)
    return spec


def _write_sr(path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = BasicTextSRStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientName = "Dose^Report"
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """An export with every bad case of the issue, next to good series."""
    src = tmp_path_factory.mktemp("export")
    good = _series(src / "good series ü", seed=1)
    _series(src / "Ünïcödé patient" / "scan one", seed=2)
    (src / "README.txt").write_text("export notes")
    (src / "empty.dcm").write_bytes(b"")
    (src / "not really.dcm").write_text("this is a text file named .dcm")
    blob = next((src / "good series ü").glob("*.dcm")).read_bytes()
    (src / "broken").mkdir()
    (src / "broken" / "truncated.dcm").write_bytes(blob[: len(blob) // 2])
    ds = pydicom.dcmread(next((src / "good series ü").glob("*.dcm")))
    del ds.PixelData
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(src / "broken" / "no pixels.dcm")
    _write_sr(src / "dose report.dcm")
    # missing slice: drop the 3rd of 6
    spec = _series(src / "gap", n=6, seed=3)
    (src / "gap" / "IM0003.dcm").unlink()
    # exact duplicate file (a copy): skipped; conflicting duplicate: quarantined
    (src / "good series ü" / "copy of IM0002.dcm").write_bytes(
        (src / "good series ü" / "IM0002.dcm").read_bytes()
    )
    conflict = _series(src / "conflict", n=4, seed=4)
    ds = pydicom.dcmread(src / "conflict" / "IM0002.dcm")
    ds.SOPInstanceUID = generate_uid()
    arr = ds.pixel_array.copy()
    arr[0, 0] += 1
    ds.PixelData = arr.tobytes()
    ds.save_as(src / "conflict" / "IM0002b.dcm")
    # mixed matrix sizes in one SeriesInstanceUID: split in two series of their own
    mixed = SeriesSpec(phantom(4, 20, 16, seed=5))
    write_series(mixed, src / "mixed")
    write_series(
        SeriesSpec(
            phantom(3, 24, 24, seed=6),
            series_uid=mixed.series_uid,
            file_prefix="B",
            origin=(0, 0, 100),
        ),  # fmt: skip
        src / "mixed",
    )
    _series(src / "single", n=1, seed=7)
    _series(src / "scout", n=3, seed=8, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    _series(src / "derived", n=3, seed=9, image_type=("DERIVED", "SECONDARY", "MPR"))
    _series(src / "burned", n=3, seed=10, extra={"BurnedInAnnotation": "YES"})
    _series(src / "tilted", n=4, seed=11, tilt_mm_per_slice=0.8)
    # NIfTI: good, NaN, 2D, 4D, garbage
    nib.save(nib.Nifti1Image(np.arange(8 * 9 * 10, dtype=np.int16).reshape(8, 9, 10), np.eye(4)),
             src / "good vol.nii.gz")  # fmt: skip
    nan = np.zeros((8, 8, 8), np.float32)
    nan[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), src / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), src / "flat2d.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.int16), np.eye(4)), src / "four_d.nii")
    (src / "garbage.nii.gz").write_bytes(b"\x1f\x8b\x08 not really gzip")
    (src / "loop").symlink_to(src)
    (src / "dangling").symlink_to(src / "nowhere")
    ws = Workspace(tmp_path_factory.mktemp("ws"))
    result = ingest(src, ws, None, IngestConfig(workers=1), progress=False)
    return src, ws, result, {"good": good, "gap": spec, "conflict": conflict, "mixed": mixed}


EXPECTED = {
    "README.txt": ("skipped", "not DICOM or NIfTI"),
    "empty.dcm": ("quarantined", "unreadable DICOM"),
    "not really.dcm": ("quarantined", "unreadable DICOM"),
    "broken/truncated.dcm": ("quarantined", "unreadable DICOM"),
    "broken/no pixels.dcm": ("quarantined", "DICOM without"),
    "dose report.dcm": ("skipped", "non-image DICOM object"),
    "gap/IM0004.dcm": ("quarantined", "missing slice"),
    "good series ü/copy of IM0002.dcm": ("skipped", "duplicate of good series ü/IM0002.dcm"),
    "conflict/IM0001.dcm": ("quarantined", "duplicate slice position"),
    "single/IM0001.dcm": ("quarantined", "single-slice series"),
    "scout/IM0001.dcm": ("skipped", "localizer"),
    "derived/IM0002.dcm": ("skipped", "derived or secondary capture"),
    "burned/IM0003.dcm": ("quarantined", "burned-in annotation"),
    "tilted/IM0001.dcm": ("quarantined", "gantry tilt"),
    "nan.nii.gz": ("quarantined", "invalid NIfTI"),
    "flat2d.nii.gz": ("quarantined", "invalid NIfTI"),
    "four_d.nii": ("quarantined", "invalid NIfTI"),
    "garbage.nii.gz": ("quarantined", "invalid NIfTI"),
}


@pytest.mark.parametrize("path", EXPECTED)
def test_bad_input_outcomes_follow_the_policy_table(corpus, path):
    _, ws, _, _ = corpus
    status, prefix = EXPECTED[path]
    rec = _files(ws)[path]
    assert (rec["status"], rec["reason"][: len(prefix)]) == (status, prefix), rec


def test_every_file_once_and_the_good_ones_ingested(corpus):
    src, ws, result, _ = corpus
    report = _report(ws)
    on_disk = sorted(
        os.path.relpath(os.path.join(r, f), src)
        for r, _, fs in os.walk(src)
        for f in fs
        if os.path.isfile(os.path.join(r, f))
    )
    assert [f["path"] for f in report["files"]] == on_disk
    assert report["links_not_followed"] == ["dangling", "loop"]
    files = _files(ws)
    for folder in ("good series ü/IM", "Ünïcödé patient/scan one/", "mixed/"):
        recs = [f for p, f in files.items() if p.startswith(folder)]
        assert recs and all(f["status"] == "ingested" for f in recs), folder
    mixed_scans = {f["scan_id"] for p, f in files.items() if p.startswith("mixed/")}
    assert len(mixed_scans) == 2  # one SeriesInstanceUID, two matrix sizes, two volumes
    assert files["good vol.nii.gz"]["status"] == "ingested"
    # every quarantined file is in the catalog's quarantine table with its reason, named by its
    # position in the report (source paths stay in the report)
    q = {r["path"]: r["reason"] for r in Catalog(ws.catalog_url).quarantined()}
    listed = _report(ws)["files"]
    assert set(q) == {f"#{i}" for i, f in enumerate(listed) if f["status"] == "quarantined"}
    for key, reason in q.items():
        assert reason.split(" (")[0] == listed[int(key[1:])]["reason"].split(" (")[0]
    assert result.counts["scans"] == 5


def test_policies_are_configurable(tmp_path):
    src = tmp_path / "src"
    _series(src / "gap", n=6, seed=3)
    (src / "gap" / "IM0003.dcm").unlink()
    _series(src / "derived", n=3, seed=9, image_type=("DERIVED", "SECONDARY", "MPR"))
    _series(src / "burned", n=3, seed=10, extra={"BurnedInAnnotation": "YES"})
    _series(src / "scout", n=3, seed=8, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    cfg = IngestConfig(
        workers=1,
        on_missing_slice="convert",
        on_derived="convert",
        allow_burned_in=True,
        on_localizer="quarantine",
    )
    ws = Workspace(tmp_path / "ws")
    ingest(src, ws, None, cfg, progress=False)
    files = _files(ws)
    assert files["gap/IM0001.dcm"]["status"] == "ingested"
    assert any("missing slice" in w for w in files["gap/IM0001.dcm"]["warnings"])
    assert files["derived/IM0001.dcm"]["status"] == "ingested"
    assert any("derived" in w for w in files["derived/IM0001.dcm"]["warnings"])
    assert files["burned/IM0001.dcm"]["status"] == "ingested"
    assert files["scout/IM0001.dcm"]["status"] == "quarantined"


def _multi_echo(src) -> None:
    uid = generate_uid()
    for echo in (1, 2):
        write_series(
            SeriesSpec(
                phantom(4, 20, 16, seed=echo),
                series_uid=uid,
                modality="MR",
                extra={"EchoNumbers": echo, "EchoTime": 10 * echo},
                file_prefix=f"E{echo}_",
            ),  # fmt: skip
            src / "echoes",
        )


@pytest.mark.parametrize("on_4d", ["split", "quarantine"])
def test_4d_series_split_or_rejected(tmp_path, on_4d):
    src = tmp_path / "src"
    _multi_echo(src)
    ws = Workspace(tmp_path / "ws")
    result = ingest(src, ws, None, IngestConfig(workers=1, on_4d=on_4d), progress=False)
    files = _files(ws)
    if on_4d == "split":
        assert result.counts["scans"] == 2
        assert files["echoes/E1_0001.dcm"]["scan_id"] != files["echoes/E2_0001.dcm"]["scan_id"]
        assert "4D series split by EchoNumbers" in files["echoes/E2_0001.dcm"]["warnings"]
    else:
        assert result.counts["scans"] == 0
        assert files["echoes/E1_0001.dcm"]["reason"].startswith("4D series")


IDENTITY = {
    "PatientName": "Zebedee^Quixotic-Marlowe",
    "PatientID": "MRN-88442211",
    "PatientBirthDate": "19571103",
    "AccessionNumber": "ACC-5566778899",
    "InstitutionName": "Hospital of Saint Wilhelmina Fairweather",
    "InstitutionAddress": "17 Larkspur Crescent, Dunmorrow",
    "ReferringPhysicianName": "Oddfellow^Rutherford",
    "PerformingPhysicianName": "Quimby^Ottoline",
    "OperatorsName": "Tech^Barnaby-Flint",
    "PatientAddress": "42 Wisteria Lane, Glenhollow",
    "OtherPatientIDs": "OTHER-ID-31337",
    "StudyID": "STUDY-ID-777",
    "StationName": "CT-WILHELMINA-01",
}


def test_no_identity_in_anything_the_pipeline_writes(tmp_path, caplog):
    src = tmp_path / "src"
    _series(src / "study" / "series", seed=1, identity=IDENTITY)
    _series(src / "study" / "single", n=1, seed=2, identity=IDENTITY)  # quarantined: reason
    img = nib.Nifti1Image(np.ones((6, 6, 6), np.int16), np.eye(4))
    img.header["descrip"] = IDENTITY["PatientName"].encode()
    img.header["aux_file"] = IDENTITY["PatientID"].encode()
    nib.save(img, src / "from exporter.nii.gz")
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.DictWriter(fh, ["patient_id", "label"])
        w.writeheader()
        w.writerow({"patient_id": IDENTITY["PatientID"], "label": "covid"})
    ws = Workspace(tmp_path / "ws")
    caplog.set_level(logging.DEBUG)
    result = ingest(src, ws, labels, IngestConfig(workers=1), progress=False)
    assert result.counts["scans"] == 2
    assert Catalog(ws.catalog_url).list_scans()[0]["label"] == "covid"  # matched before hashing
    needles = {v.encode() for v in IDENTITY.values()}
    needles |= {p.encode() for v in IDENTITY.values() for p in v.split("^") if len(p) > 3}
    needles |= {b"1957-11-03", b"Zebedee", b"Quixotic"}
    written = [p for p in ws.root.rglob("*") if p.is_file() and p.name != ".deid-secret"]
    assert any(p.suffix == ".gz" for p in written) and any(p.name == "catalog.db" for p in written)
    for path in written:
        blob = path.read_bytes()
        if path.name.endswith(".gz"):
            blob = gzip.decompress(blob)
        hits = [n for n in needles if n in blob]
        assert not hits, f"{path.relative_to(ws.root)} contains {hits}"
    assert not [n for n in needles if n.decode() in caplog.text]
    secret = ws.secret_file
    assert secret.stat().st_mode & 0o777 == 0o600


def test_study_dates_are_shifted_per_patient_or_dropped(tmp_path):
    src = tmp_path / "src"
    for i, date in enumerate(("20200115", "20200301")):
        _series(src / f"s{i}", seed=i, identity={"PatientID": "P-1", "StudyDate": date},
                study_uid=generate_uid())  # fmt: skip
    ws = Workspace(tmp_path / "ws")
    ingest(src, ws, None, IngestConfig(workers=1, date_shift_max_days=3650), progress=False)
    dates = sorted(r["study_date"] for r in Catalog(ws.catalog_url).list_scans(labelled=False))
    assert "2020-01-15" not in dates and "2020-03-01" not in dates
    d0, d1 = (np.datetime64(d) for d in dates)
    assert int((d1 - d0).astype(int)) == 46  # the interval between studies survives
    ws2 = Workspace(tmp_path / "ws2")
    ingest(src, ws2, None, IngestConfig(workers=1, dates="drop"), progress=False)
    assert {r["study_date"] for r in Catalog(ws2.catalog_url).list_scans(labelled=False)} == {None}


@pytest.mark.parametrize("key", ["patient_id", "study_uid", "series_uid", "path", "folders"])
def test_labels_by_every_key_or_by_folder(tmp_path, key):
    src = tmp_path / "src"
    specs = {
        "covid": _series(src / "covid" / "a", seed=1, identity={"PatientID": "PA"}),
        "normal": _series(src / "normal" / "b", seed=2, identity={"PatientID": "PB"}),
    }
    labels = None
    if key != "folders":
        labels = tmp_path / "labels.csv"
        value = {
            "patient_id": lambda lab, s: "PA" if lab == "covid" else "PB",
            "study_uid": lambda lab, s: s.study_uid,
            "series_uid": lambda lab, s: s.series_uid,
            "path": lambda lab, s: f"{lab}/{'a' if lab == 'covid' else 'b'}",
        }[key]
        with labels.open("w", newline="") as fh:
            w = csv.DictWriter(fh, [key, "label"])
            w.writeheader()
            for lab, s in specs.items():
                w.writerow({key: value(lab, s), "label": lab})
    cfg = IngestConfig(workers=1, folder_labels=key == "folders")
    ws = Workspace(tmp_path / "ws")
    ingest(src, ws, labels, cfg, progress=False)
    assert sorted(r["label"] for r in Catalog(ws.catalog_url).list_scans()) == ["covid", "normal"]


def test_rounded_oblique_orientation_is_not_gantry_tilt(tmp_path):
    """ImageOrientationPatient stored to 6 decimals (as scanners and our MRI phantoms write
    it) makes the raw normal a hair short of unit length; that is no tilt. A real shear is."""
    from medml.ingest.dicom import Series, Slice, check_series, read_header

    # from a synthetic T2 oblique series: |row x col| = 1 - 7e-7, which arccos read as 0.07 deg
    iop = (0.999864, 0.0, -0.016464, 0.004560, 0.960875, 0.276944)
    straight = tmp_path / "oblique"
    _series(straight, n=40, seed=3, iop=iop, slice_step=6.19, pixel_spacing=(3.6, 3.6))
    sheared = tmp_path / "sheared"
    _series(sheared, n=40, seed=3, iop=iop, slice_step=6.19, tilt_mm_per_slice=0.05)
    problems = {}
    for folder in (straight, sheared):
        slices = [Slice(p, read_header(p)) for p in sorted(folder.glob("*.dcm"))]
        problems[folder.name] = [p.case for p in check_series(Series("1.2.3", slices))]
    assert problems == {"oblique": [], "sheared": ["gantry_tilt"]}


def test_fifos_are_named_never_opened_and_unlistable_folders_are_reported(tmp_path):
    """A FIFO used to be listed among links (and a read of it hangs); a folder that cannot be
    listed was missing from the report altogether."""
    from medml.ingest import ingest
    from medml.workspace import Workspace

    src = tmp_path / "src"
    (src / "locked").mkdir(parents=True)
    (src / "notes.txt").write_text("not an image")
    os.mkfifo(src / "pipe")
    os.chmod(src / "locked", 0)
    try:
        result = ingest(src, Workspace(tmp_path / "ws"), progress=False)
    finally:
        os.chmod(src / "locked", 0o755)
    report = json.loads(result.report_path.read_text())
    assert report["special_files"] == ["pipe"]
    assert report["links_not_followed"] == []
    assert [f["path"] for f in report["files"]] == ["notes.txt"]
    if os.geteuid() != 0:  # root lists any folder: only a user can be refused
        assert report["unreadable_folders"] == ["locked"]


def test_uih_mosaic_is_refused_as_a_mosaic_not_as_single_slices(tmp_path):
    """UIH stores an EPI volume as tiles of one plane (ImageType VFRAME), the tile positions in
    a private sequence: each file looks like one slice at one position. The reason must say
    what the file is, not "single-slice series", and nothing is converted."""
    src = tmp_path / "src"
    uih = {"image_type": ("ORIGINAL", "PRIMARY", "M", "VFRAME"), "modality": "MR",
           "extra": {"Manufacturer": "UIH"}}  # fmt: skip
    _series(src / "bold", n=4, rows=32, cols=32, seed=3, slice_step=0.0, **uih)  # time series
    _series(src / "b0", n=1, rows=32, cols=32, seed=4, **uih)  # one volume
    ws = Workspace(tmp_path / "ws")
    result = ingest(src, ws, None, IngestConfig(), progress=False)
    files = _files(ws)
    assert len(files) == 5 and result.counts["scans"] == 0
    for f in files.values():
        assert f["status"] == "quarantined"
        assert f["reason"].startswith("unsupported DICOM: UIH mosaic (ImageType VFRAME")
