"""Conversion against dcm2niix, the field's reference converter.

For every series medml converts: voxels equal to dcm2niix's and affines within 1e-3 mm, after
both are reoriented to canonical RAS. Generated series cover orientations, patient positions,
slice order, rescale variants, signed/unsigned pixels, compressed syntaxes and multi-frame;
bundled files come from pydicom and nibabel.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from medml.catalog import Catalog
from medml.config import IngestConfig
from medml.ingest import dicom, ingest, nifti
from medml.ingest.fixtures import (
    ORIENTATIONS,
    SeriesSpec,
    oblique,
    phantom,
    write_deflated,
    write_enhanced,
    write_series,
)
from medml.workspace import Workspace

DCM2NIIX = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
NICOM_DATA = Path(nib.__file__).parent / "nicom" / "tests" / "data"
TOL_MM = 1e-3

pytestmark = pytest.mark.skipif(not Path(DCM2NIIX).exists(), reason="dcm2niix is not installed")


def _canonical(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    canon = nib.as_closest_canonical(img)
    return np.asarray(canon.get_fdata(dtype=np.float64)), canon.affine


def _run_dcm2niix(src: Path, out: Path) -> dict[str, Path]:
    """Convert ``src``; return output NIfTI by SeriesInstanceUID (``%j``)."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [DCM2NIIX, "-z", "n", "-b", "n", "-f", "%j", "-o", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode in (0, 2), proc.stdout + proc.stderr  # 2: some files not DICOM
    return {p.name[: -len(".nii")]: p for p in out.glob("*.nii")}


def _ingested_by_series_uid(src: Path, ws: Workspace) -> dict[str, tuple[str, list[Path]]]:
    """scan_id and source files of every ingested scan, keyed by its SeriesInstanceUID."""
    report = json.loads(sorted(ws.reports.glob("ingest-*.json"))[-1].read_text())
    out: dict[str, tuple[str, list[Path]]] = {}
    for rec in report["files"]:
        if rec["status"] == "ingested":
            uid = str(pydicom.dcmread(src / rec["path"], stop_before_pixels=True).SeriesInstanceUID)
            out.setdefault(uid, (rec["scan_id"], []))[1].append(src / rec["path"])
    return out


def _compare(ws: Workspace, scan_id: str, reference: Path, label: str) -> None:
    scan = Catalog(ws.catalog_url).get_scan(scan_id)
    ours_data, ours_aff = _canonical(nib.load(ws.root / scan["volume"]))
    ref_data, ref_aff = _canonical(nib.load(reference))
    assert ours_data.shape == ref_data.shape, label
    np.testing.assert_allclose(ours_aff, ref_aff, atol=TOL_MM, err_msg=label)
    np.testing.assert_allclose(ours_data, ref_data, rtol=1e-6, atol=1e-4, err_msg=label)


GENERATED = {
    **{name: {"iop": iop} for name, iop in ORIENTATIONS.items()},
    "oblique_20_15": {"iop": oblique(20, 15)},
    "oblique_-35_50": {"iop": oblique(-35, 50), "pixel_spacing": (1.1, 0.9)},
    "descending_files": {"descending": True},
    "negative_step": {"slice_step": -3.0, "descending": True},
    "rescale_float": {"slope": 2.5, "intercept": -100.0},
    "rescale_identity": {"slope": 1.0, "intercept": 0.0},
    "signed": {"signed": True, "intercept": 0.0},
    "rle": {"transfer_syntax": RLELossless},
    "jpeg2000": {"transfer_syntax": JPEG2000Lossless},
}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    src = tmp_path_factory.mktemp("gen")
    specs = {}
    for i, (name, kw) in enumerate(GENERATED.items()):
        signed = kw.get("signed", False)
        spec = SeriesSpec(phantom(6, 36, 32, seed=i, signed=signed), **kw)
        write_series(spec, src / name)
        specs[name] = spec
    spec = SeriesSpec(phantom(5, 12, 10, seed=99))
    write_deflated(spec, src / "deflate")
    specs["deflate"] = spec
    spec = SeriesSpec(phantom(5, 12, 10, seed=98), iop=oblique(10, -20))
    write_enhanced(spec, src / "enhanced" / "multiframe.dcm")
    specs["enhanced"] = spec
    ws = Workspace(tmp_path_factory.mktemp("ws"))
    ingest(src, ws, None, IngestConfig(workers=1), progress=False)
    refs = _run_dcm2niix(src, tmp_path_factory.mktemp("d2n"))
    return src, ws, specs, refs


def test_every_generated_series_is_converted(generated):
    src, ws, specs, _ = generated
    ours = _ingested_by_series_uid(src, ws)
    assert {s.series_uid for s in specs.values()} <= set(ours)


# dcm2niix does not read the deflated syntax ("inflate with dcmconv"): that one is checked
# against the ground truth below instead.
@pytest.mark.parametrize("name", [*GENERATED, "enhanced"])
def test_generated_series_match_dcm2niix(generated, name):
    src, ws, specs, refs = generated
    uid = specs[name].series_uid
    scan_id, _ = _ingested_by_series_uid(src, ws)[uid]
    _compare(ws, scan_id, refs[uid], name)


@pytest.mark.parametrize(
    "name", ["axial_HFS", "oblique_-35_50", "negative_step", "enhanced", "deflate"]
)
def test_generated_series_match_ground_truth(generated, name):
    """Independent of dcm2niix: voxel (i, j, k) sits where the writer put it."""
    src, ws, specs, _ = generated
    spec = specs[name]
    scan_id, _ = _ingested_by_series_uid(src, ws)[spec.series_uid]
    img = nib.load(ws.root / Catalog(ws.catalog_url).get_scan(scan_id)["volume"])
    truth = nib.Nifti1Image(
        (spec.stored.astype(float) * float(spec.slope) + float(spec.intercept)).transpose(2, 1, 0),
        np.diag([-1.0, -1, 1, 1]) @ spec.lps_affine(),
    )
    want_data, want_aff = _canonical(truth)
    got_data, got_aff = _canonical(img)
    np.testing.assert_allclose(got_aff, want_aff, atol=TOL_MM)
    np.testing.assert_array_equal(got_data, want_data)


def test_per_slice_rescale_matches_dcm2niix(tmp_path):
    slopes = [1.0, 1.5, 2.0, 0.5, 3.0]
    spec = SeriesSpec(phantom(5, 12, 10, seed=5), slope=slopes, intercept=[-10, 0, 5, 7, -3])
    write_series(spec, tmp_path / "src" / "s")
    ws = Workspace(tmp_path / "ws")
    ingest(tmp_path / "src", ws, None, IngestConfig(workers=1), progress=False)
    refs = _run_dcm2niix(tmp_path / "src", tmp_path / "d2n")
    scan_id, _ = _ingested_by_series_uid(tmp_path / "src", ws)[spec.series_uid]
    _compare(ws, scan_id, refs[spec.series_uid], "per-slice rescale")


def test_pydicom_dicomdirtests_match_dcm2niix(tmp_path):
    src = PYDICOM_FILES / "dicomdirtests"
    ws = Workspace(tmp_path / "ws")
    result = ingest(src, ws, None, IngestConfig(workers=1), progress=False)
    refs = _run_dcm2niix(src, tmp_path / "d2n")
    ours = _ingested_by_series_uid(src, ws)
    assert ours, "nothing converted from pydicom's multi-series folder"
    for uid, (scan_id, _) in ours.items():
        assert uid in refs, f"dcm2niix did not make one volume of series {uid}"
        _compare(ws, scan_id, refs[uid], uid)
    assert result.counts["files"] == sum(1 for p in src.rglob("*") if p.is_file())


# nibabel's own DICOMs are a Siemens mosaic (0.dcm, 1.dcm) and header fragments without a
# SeriesInstanceUID or pixel data: ingest quarantines those (test_bundled_nibabel_dicom_...).
BUNDLED_SINGLE = [
    PYDICOM_FILES / "CT_small.dcm",
    PYDICOM_FILES / "MR_small.dcm",
    PYDICOM_FILES / "MR_small_RLE.dcm",
    PYDICOM_FILES / "MR_small_jp2klossless.dcm",
    PYDICOM_FILES / "MR_small_jpeg_ls_lossless.dcm",
    PYDICOM_FILES / "MR_small_bigendian.dcm",
    PYDICOM_FILES / "MR_small_implicit.dcm",
]


@pytest.mark.parametrize("path", BUNDLED_SINGLE, ids=lambda p: p.name)
def test_bundled_single_files_decode_like_dcm2niix(tmp_path, path):
    """Single slices (quarantined by ingest) still exercise decoding and in-plane geometry."""
    if not path.exists():
        pytest.skip(f"{path.name} is not bundled with the installed package")
    shutil.copy(path, tmp_path / path.name)
    header = dicom.read_header(tmp_path / path.name)
    series = dicom.group_series([dicom.Slice(tmp_path / path.name, header)])[0]
    data, affine = dicom.load_volume(series)
    refs = _run_dcm2niix(tmp_path, tmp_path / "d2n")
    ref = nib.load(refs[str(header.SeriesInstanceUID)])
    ref_data = np.asarray(ref.get_fdata()).reshape(data.shape)
    # dcm2niix stores rows bottom-up (a y flip); compare after putting both in RAS
    ours = nib.as_closest_canonical(nib.Nifti1Image(data.astype(np.float64), affine))
    theirs = nib.as_closest_canonical(nib.Nifti1Image(ref_data, ref.affine))
    np.testing.assert_allclose(np.asarray(ours.dataobj), np.asarray(theirs.dataobj), atol=1e-3)
    np.testing.assert_allclose(ours.affine[:3, :2], theirs.affine[:3, :2], atol=TOL_MM)


def test_bundled_nifti_reoriented_like_nibabel(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("anatomical.nii", "functional.nii", "example4d.nii.gz", "standard.nii.gz",
                 "example_nifti2.nii.gz", "reoriented_anat_moved.nii"):  # fmt: skip
        if (NIBABEL_DATA / name).exists():
            shutil.copy(NIBABEL_DATA / name, src / name)
    ws = Workspace(tmp_path / "ws")
    ingest(src, ws, None, IngestConfig(workers=1), progress=False)
    report = json.loads(sorted(ws.reports.glob("ingest-*.json"))[-1].read_text())
    by_path = {f["path"]: f for f in report["files"]}
    assert by_path["functional.nii"]["status"] == "quarantined"
    assert "4D" in by_path["functional.nii"]["reason"]
    ingested = [p for p, f in by_path.items() if f["status"] == "ingested"]
    assert "anatomical.nii" in ingested
    catalog = Catalog(ws.catalog_url)
    for name in ingested:
        img = nib.load(ws.root / catalog.get_scan(by_path[name]["scan_id"])["volume"])
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        want_data, want_aff = _canonical(nib.load(src / name))
        got_data, got_aff = _canonical(img)
        np.testing.assert_allclose(got_aff, want_aff, atol=TOL_MM)
        np.testing.assert_allclose(got_data, want_data, atol=1e-4)


def test_bundled_nibabel_dicom_is_accounted_for(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for folder in (NIBABEL_DATA, NICOM_DATA):
        for p in folder.glob("*.dcm*"):
            shutil.copy(p, src / f"{folder.parent.name}-{p.name}")
    ws = Workspace(tmp_path / "ws")
    result = ingest(src, ws, None, IngestConfig(workers=1), progress=False)
    report = json.loads(result.report_path.read_text())
    assert result.counts["files"] == len(list(src.iterdir()))
    reasons = {f["path"]: f.get("reason", "") for f in report["files"]}
    assert reasons["tests-0.dcm"].startswith("unsupported DICOM: Siemens mosaic")
    assert all(r for r in reasons.values())  # single images and fragments: all with a reason


@pytest.mark.parametrize("seed", range(6))
def test_to_canonical_equals_nibabel_closest_canonical(seed):
    """nifti.to_canonical reorients without nibabel's intermediate images: same bytes."""
    rng = np.random.default_rng(seed)
    data = rng.integers(-1000, 3000, (5, 6, 7)).astype(np.int32)
    rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    affine = np.eye(4)
    affine[:3, :3] = rot * rng.uniform(0.5, 3, 3)
    affine[:3, 3] = rng.normal(0, 50, 3)
    if seed == 0:
        affine[:3, :3] = np.diag([0.8, 0.7, 2.5])  # already canonical
    canon = nib.as_closest_canonical(nib.Nifti1Image(nifti._compact(data), affine))
    ref = nib.Nifti1Image(np.asfortranarray(np.asarray(canon.dataobj)), canon.affine)
    ref.set_qform(canon.affine, code=1)
    ref.set_sform(canon.affine, code=1)
    got = nifti.to_canonical(data, affine)
    assert nifti.nifti_gz_bytes(got) == nifti.nifti_gz_bytes(ref)
    assert nifti.content_hash(got) == nifti.content_hash(ref)
