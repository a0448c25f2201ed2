import csv
import gzip
import hashlib
import json
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medml.catalog import Catalog
from medml.config import IngestConfig
from medml.ingest import ingest
from medml.workspace import Workspace


def _tree_hash(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def _latest_report(ws):
    return json.loads(sorted(ws.reports.glob("ingest-*.json"))[-1].read_text())


def test_report_accounts_for_every_file(ingested, tiny_raw):
    report = _latest_report(ingested)
    on_disk = sorted(p.relative_to(tiny_raw).as_posix() for p in tiny_raw.rglob("*") if p.is_file())
    assert sorted(f["path"] for f in report["files"]) == on_disk
    c = report["counts"]
    assert c["files"] == len(on_disk) == c["ingested"] + c["skipped"] + c["quarantined"]
    with (tiny_raw / "labels.csv").open() as fh:
        assert c["scans"] == len(list(csv.DictReader(fh)))
    assert {"path": "labels.csv", "status": "skipped", "reason": "not DICOM or NIfTI"} in report[
        "files"
    ]


def test_volumes_are_canonical_ras_with_dicom_geometry(ingested, tiny_raw):
    catalog = Catalog(ingested.catalog_url)
    row = next(r for r in csv.DictReader((tiny_raw / "labels.csv").open()) if r["series_uid"])
    report = _latest_report(ingested)
    scan_id = next(f["scan_id"] for f in report["files"] if f["path"].startswith(row["path"] + "/"))
    scan = catalog.get_scan(scan_id)
    assert scan["label"] == row["label"] and scan["source_format"] == "dicom"
    img = nib.load(ingested.root / scan["volume"])
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    # Voxel (i, j, k) of the RAS volume must sit where DICOM says the pixel is.
    files = sorted((tiny_raw / row["path"]).glob("*.dcm"))
    first = min((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
    ipp = np.array(first.ImagePositionPatient, float)
    hu = first.pixel_array * float(first.RescaleSlope) + float(first.RescaleIntercept)
    data = np.asarray(img.dataobj)
    inv = np.linalg.inv(img.affine)
    for r, c in [(0, 0), (5, 9), (hu.shape[0] - 1, hu.shape[1] - 1)]:
        lps = (
            ipp
            + c * float(first.PixelSpacing[1]) * np.array([1, 0, 0])
            + r * float(first.PixelSpacing[0]) * np.array([0, 1, 0])
        )
        ijk = np.rint(inv @ np.array([-lps[0], -lps[1], lps[2], 1.0]))[:3].astype(int)
        assert data[tuple(ijk)] == hu[r, c]


def test_no_identity_leaves_ingestion(ingested, tiny_raw):
    identities = set()
    for f in tiny_raw.rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        identities |= {
            str(ds.PatientName),
            str(ds.PatientID),
            str(ds.AccessionNumber),
            str(ds.InstitutionName),
            str(ds.PatientBirthDate),
        }
    with (tiny_raw / "labels.csv").open() as fh:
        identities |= {r["patient_id"] for r in csv.DictReader(fh)}
    for nii in tiny_raw.rglob("*.nii.gz"):  # the generator puts names into descrip, as exporters do
        identities.add(nib.load(nii).header["descrip"].item().decode())
    identities.discard("")
    needles = [s.encode() for s in identities] + [
        s.split("^")[0].encode() for s in identities if "^" in s
    ]
    for path in ingested.root.rglob("*"):
        if not path.is_file() or path.name.startswith(".deid"):
            continue
        blob = path.read_bytes()
        if path.name.endswith(".gz"):
            blob = gzip.decompress(blob)
        hits = [n for n in needles if n in blob]
        assert not hits, f"{path} contains {hits}"


def test_rerun_is_idempotent_and_inputs_untouched(tmp_path, tiny_raw, tiny_settings):
    before = _tree_hash(tiny_raw)
    ws = Workspace(tmp_path / "ws")
    first = ingest(tiny_raw, ws, tiny_raw / "labels.csv", progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in ws.volumes.iterdir()}
    second = ingest(tiny_raw, ws, tiny_raw / "labels.csv", progress=False)
    assert first.scan_ids == second.scan_ids
    assert len(Catalog(ws.catalog_url).list_scans()) == len(first.scan_ids)
    assert {p: p.stat().st_mtime_ns for p in ws.volumes.iterdir()} == mtimes  # nothing rewritten
    assert _tree_hash(tiny_raw) == before
    assert not [p for p in ws.root.rglob(".*.tmp")]


def test_bad_inputs_are_quarantined_with_reasons_and_the_rest_goes_on(tmp_path, tiny_raw):
    src = tmp_path / "export"
    series = next(p for p in (tiny_raw / "dicom").rglob("series-1"))
    shutil.copytree(series, src / "good series")
    (src / "notes.txt").write_text("hello")
    (src / "empty.dcm").write_bytes(b"")
    blob = (series / "IM0001.dcm").read_bytes()
    (src / "broken" / "truncated.dcm").parent.mkdir()
    (src / "broken" / "truncated.dcm").write_bytes(blob[: len(blob) // 3])
    (src / "garbage.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), src / "flat2d.nii.gz")
    nan = np.zeros((8, 8, 8), np.float32)
    nan[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), src / "naïve nan.nii.gz")
    gap = src / "gap"
    gap.mkdir()
    for f in sorted(series.glob("*.dcm")):
        if f.name != "IM0003.dcm":  # a missing slice, in a series of its own
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
            ds.save_as(gap / f.name)
    (src / "loop").symlink_to(src)

    ws = Workspace(tmp_path / "ws")
    result = ingest(src, ws, None, IngestConfig(), progress=False)
    files = {f["path"]: f for f in _latest_report(ws)["files"]}
    assert files["notes.txt"]["status"] == "skipped"
    assert files["empty.dcm"]["status"] in {"skipped", "quarantined"}
    assert files["broken/truncated.dcm"]["status"] == "quarantined"
    assert files["garbage.nii.gz"]["status"] == "quarantined"
    assert "2D" in files["flat2d.nii.gz"]["reason"]
    assert "NaN" in files["naïve nan.nii.gz"]["reason"]
    assert files["gap/IM0004.dcm"]["reason"].startswith("missing slice")
    good = [f for p, f in files.items() if p.startswith("good series/")]
    assert good and all(f["status"] == "ingested" for f in good)
    assert result.counts["scans"] == 1


@pytest.mark.parametrize("column", ["series_uid", "path"])
def test_labels_match_by_series_uid_or_path(tmp_path, tiny_raw, column):
    rows = list(csv.DictReader((tiny_raw / "labels.csv").open()))
    dicom_rows = [r for r in rows if r["series_uid"]]
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[column, "label"])
        w.writeheader()
        w.writerows({column: r[column], "label": r["label"]} for r in dicom_rows)
    ws = Workspace(tmp_path / "ws")
    ingest(tiny_raw, ws, labels, progress=False)
    assert len(Catalog(ws.catalog_url).list_scans()) == len(dicom_rows)


@pytest.mark.parametrize(
    "dtype, slope, inter, shape",
    [
        ("<i2", None, None, (7, 6, 5)),
        (">i2", None, None, (7, 6, 5)),  # big-endian voxels
        ("<u2", 1.0, 0.0, (7, 6, 5, 1)),  # identity scaling, a 4D file of one volume
        ("<i2", 2.5, -100.0, (7, 6, 5)),  # scaled: nibabel applies the scaling
        ("<f4", None, None, (7, 6, 5)),
    ],
)
def test_gzip_nifti_reads_as_nibabel_reads_it(tmp_path, dtype, slope, inter, shape):
    """The gzip NIfTI-1 reader views the inflated voxels in place; values, scaling, affine and
    writability must equal nibabel's own loader."""
    from medml.ingest.nifti import load_nifti

    rng = np.random.default_rng(3)
    values = rng.integers(-500, 500, size=shape).astype(np.dtype(dtype).newbyteorder("="))
    affine = np.array([[-2.0, 0, 0, 10], [0, 0, 1.5, -4], [0, 3.0, 0, 7], [0, 0, 0, 1]])
    img = nib.Nifti1Image(values, affine)
    img.header.set_data_dtype(np.dtype(dtype))
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    path = tmp_path / "v.nii.gz"
    nib.save(img, str(path))

    data, got_affine = load_nifti(path)
    ref = nib.load(str(path))
    expected = np.asanyarray(ref.dataobj).reshape(shape[:3])
    assert data.dtype == expected.dtype
    np.testing.assert_array_equal(data, expected)
    np.testing.assert_allclose(got_affine, ref.affine)
    assert data.flags.writeable
