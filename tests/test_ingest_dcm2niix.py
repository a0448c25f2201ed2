"""4D series, mosaics, enhanced stacks and 12-bit data against dcm2niix, volume for volume.

Each case is converted by medml (each volume one scan) and by dcm2niix (4D NIfTI, or one file
per volume); the two sets of 3D volumes must be equal: the same number, voxels equal, affines
within 1e-3 mm after both are put in canonical RAS. Real data: every leaf folder of dcm2niix's
validation sets under ../shared/data/dicom. Fixtures: pydicom-written series with the structure
of the vendors' exports that are not among those sets (Philips classic 4D with private volume
indices, Canon/Toshiba, UIH and GE classic 4D, enhanced objects with several stacks, 12-bit
words with high bits set, Siemens mosaics). Series that cannot be resolved must be quarantined.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from test_ingest_geometry import DCM2NIIX, TOL_MM

from medml.catalog import Catalog
from medml.config import IngestConfig
from medml.ingest import ingest
from medml.ingest.fixtures import (
    SeriesSpec,
    oblique,
    phantom,
    volume_data,
    write_classic_4d,
    write_enhanced,
    write_enhanced_4d,
    write_mosaic,
    write_series,
)
from medml.workspace import Workspace

pytestmark = pytest.mark.skipif(not Path(DCM2NIIX).exists(), reason="dcm2niix is not installed")

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "dicom"
IMAGE_SUFFIXES = (".dcm", ".img")


def _leaves() -> list[str]:
    if not SHARED.is_dir():
        return []
    found = {p.parent for p in SHARED.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES}
    return sorted(p.relative_to(SHARED).as_posix() for p in found)


Vol = tuple[np.ndarray, np.ndarray]


def _canonical(data: np.ndarray, affine: np.ndarray) -> Vol:
    img = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    return np.asarray(img.dataobj, dtype=np.float64), img.affine


def _ours(src: Path, ws: Workspace, **cfg) -> tuple[list[Vol], dict]:
    result = ingest(src, ws, None, IngestConfig(workers=1, **cfg), progress=False)
    vols = []
    for row in Catalog(ws.catalog_url).scans_by_id().values():
        img = nib.load(ws.root / row["volume"])
        vols.append(_canonical(np.asarray(img.get_fdata()), img.affine))
    return vols, json.loads(result.report_path.read_text())


def _dcm2niix(src: Path, out: Path) -> list[Vol]:
    """dcm2niix's volumes, each 4D output split into its 3D volumes.

    ``-p n``: medml applies the standard RescaleSlope/Intercept; dcm2niix by default replaces
    them with Philips's private floating-point scaling (a constant factor per series).
    """
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [DCM2NIIX, "-b", "y", "-z", "n", "-d", "0", "-p", "n", "-o", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode in (0, 2), proc.stdout + proc.stderr
    vols = []
    for f in sorted(out.glob("*.nii")):
        img = nib.load(f)
        data = np.asarray(img.get_fdata())
        for v in [data] if data.ndim == 3 else np.moveaxis(data, 3, 0):
            vols.append(_canonical(v, img.affine))
    return vols


def _same(a: Vol, b: Vol) -> bool:
    return (
        a[0].shape == b[0].shape
        and np.allclose(a[1], b[1], atol=TOL_MM, rtol=0)
        and np.allclose(a[0], b[0], rtol=1e-5, atol=1e-4)  # dcm2niix keeps scl_slope in float32
    )


def assert_same_volumes(ours: list[Vol], refs: list[Vol], label: str) -> None:
    assert len(ours) == len(refs), f"{label}: medml {len(ours)} volumes, dcm2niix {len(refs)}"
    unmatched = list(range(len(refs)))
    for i, vol in enumerate(ours):
        j = next((j for j in unmatched if _same(vol, refs[j])), None)
        assert j is not None, f"{label}: medml volume {i} equals no dcm2niix volume"
        unmatched.remove(j)


def _statuses(report: dict) -> dict[str, dict]:
    return {f["path"]: f for f in report["files"]}


# ----------------------------------------------------------------------------- real data


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/dicom is absent")
@pytest.mark.parametrize("leaf", _leaves() or ["none"])
def test_validation_set_folder_matches_dcm2niix(tmp_path, leaf):
    src = SHARED / leaf
    ours, report = _ours(src, Workspace(tmp_path / "ws"))
    assert_same_volumes(ours, _dcm2niix(src, tmp_path / "d2n"), leaf)
    for rec in report["files"]:  # every image file became part of a scan
        if rec["path"].lower().endswith(IMAGE_SUFFIXES):
            assert rec["status"] == "ingested", rec


# ----------------------------------------------------------------------------- fixtures


def _spec(**kw) -> SeriesSpec:
    kw.setdefault("modality", "MR")
    kw.setdefault("intercept", 0.0)
    return SeriesSpec(phantom(kw.pop("n", 4), 12, 10, seed=kw.pop("seed", 0)), **kw)


def _gradient(v: int) -> list[str]:
    return [float(x) for x in np.roll([1.0, 0.0, 0.0], v)] if v else [0.0, 0.0, 0.0]


VENDOR_4D = {
    # Philips classic DTI: no public index; private gradient number (2005,1413) and b-value
    # (2001,1003); instance numbers run slice by slice
    "philips_dti": dict(
        maker="Philips Medical Systems",
        volumes=[
            {(0x2005, 0x1413): ("IS", v + 1), (0x2001, 0x1003): ("FL", 0.0 if v == 0 else 1000.0)}
            for v in range(3)
        ],  # fmt: skip
        slice_major=True,
    ),
    # Philips classic cardiac phases: private phase number (2001,1008)
    "philips_phases": dict(
        maker="Philips Medical Systems",
        volumes=[{(0x2001, 0x1008): ("IS", v + 1)} for v in range(3)],
        slice_major=True,
    ),
    # Canon/Toshiba classic fMRI: one AcquisitionNumber per volume
    "canon_fmri": dict(maker="CANON_MEC", volumes=[{"AcquisitionNumber": v + 1} for v in range(3)]),
    # UIH classic DWI: the standard b-value and gradient direction on each slice
    "uih_dwi": dict(
        maker="UIH",
        volumes=[
            {"DiffusionBValue": 0 if v == 0 else 800, "DiffusionGradientOrientation": _gradient(v)}
            for v in range(3)
        ],  # fmt: skip
    ),
    # GE classic fMRI: nothing tells the volumes apart but the instance order (as the real
    # GE series in dcm_qa_nih)
    "ge_fmri": dict(maker="GE MEDICAL SYSTEMS", volumes=[{} for _ in range(4)]),
    # temporal position identifier (Siemens/GE classic, many others)
    "temporal_id": dict(
        maker="SIEMENS", volumes=[{"TemporalPositionIdentifier": v + 1} for v in range(3)]
    ),
}


@pytest.mark.parametrize("case", VENDOR_4D)
def test_classic_4d_split_like_dcm2niix(tmp_path, case):
    kw = VENDOR_4D[case]
    spec = _spec(iop=oblique(12, -8), extra={"Manufacturer": kw["maker"]})
    write_classic_4d(spec, tmp_path / "src" / case, kw["volumes"], kw.get("slice_major", False))
    ours, report = _ours(tmp_path / "src", Workspace(tmp_path / "ws"))
    assert len(ours) == len(kw["volumes"]), report
    assert all(f["status"] == "ingested" for f in report["files"])
    assert not any("duplicate slice position" in str(f) for f in report["files"])
    assert_same_volumes(ours, _dcm2niix(tmp_path / "src" / case, tmp_path / "d2n"), case)
    # ground truth, independent of dcm2niix: volume v holds what the writer put in it
    truth = [
        _canonical(
            volume_data(spec, v).transpose(2, 1, 0).astype(float),
            np.diag([-1.0, -1, 1, 1]) @ spec.lps_affine(),
        )  # fmt: skip
        for v in range(len(kw["volumes"]))
    ]
    assert_same_volumes(ours, truth, f"{case} vs ground truth")


def test_multi_echo_time_series_split_by_two_keys(tmp_path):
    spec = _spec()
    vols = [{"EchoNumbers": e, "EchoTime": 10 * e, "TemporalPositionIdentifier": t}
            for t in (1, 2) for e in (1, 2)]  # fmt: skip
    write_classic_4d(spec, tmp_path / "src" / "me", vols)
    ours, _ = _ours(tmp_path / "src", Workspace(tmp_path / "ws"))
    assert len(ours) == 4
    assert_same_volumes(
        ours, _dcm2niix(tmp_path / "src" / "me", tmp_path / "d2n"), "multi-echo fMRI"
    )


def test_incomplete_4d_series_is_quarantined_never_converted(tmp_path):
    spec = _spec(n=5)
    write_classic_4d(spec, tmp_path / "src" / "ge", [{} for _ in range(4)], skip=[(2, 3)])
    ours, report = _ours(tmp_path / "src", Workspace(tmp_path / "ws"))
    assert ours == []
    reasons = {f["reason"] for f in report["files"]}
    assert reasons == {
        "4D series: 5 positions x 4 volumes, volume 3 incomplete (4 of 5 positions); "
        "no header key separates the volumes"
    }


def test_enhanced_object_with_several_stacks_like_dcm2niix(tmp_path):
    spec = _spec(iop=oblique(-20, 30), n=5)
    write_enhanced_4d(spec, tmp_path / "src" / "enh.dcm", n_volumes=3)
    ours, report = _ours(tmp_path / "src", Workspace(tmp_path / "ws"))
    assert len(ours) == 3, report
    assert_same_volumes(ours, _dcm2niix(tmp_path / "src", tmp_path / "d2n"), "enhanced 4D")
    files = _statuses(report)
    assert "4D series split by container" in files["enh.dcm"]["warnings"]


def test_enhanced_stacks_without_dimension_index_are_quarantined(tmp_path):
    write_enhanced_4d(_spec(n=5), tmp_path / "src" / "enh.dcm", 3, dimension_index=False)
    ours, report = _ours(tmp_path / "src", Workspace(tmp_path / "ws"))
    assert ours == []
    reason = _statuses(report)["enh.dcm"]["reason"]
    assert reason.startswith("enhanced object: 15 frames at 5 positions"), reason


@pytest.mark.parametrize("signed", [False, True])
def test_12_bit_words_with_high_bits_set_are_masked(tmp_path, signed):
    stored = phantom(4, 12, 10, seed=3, signed=signed) % 2048
    stored[:, 0, :] = 0x0F0F  # 3855 unsigned, -241 as 12-bit signed
    stored[:, 1, :] = -1 if signed else 0xFFFF  # 4095 unsigned, -1 signed
    spec = SeriesSpec(stored, signed=signed, intercept=0.0, modality="MR",
                      extra={"BitsStored": 12, "HighBit": 11})  # fmt: skip
    paths = write_series(spec, tmp_path / "src" / "s")
    ours, _ = _ours(tmp_path / "src", Workspace(tmp_path / "ws"))
    assert_same_volumes(ours, _dcm2niix(tmp_path / "src" / "s", tmp_path / "d2n"), "12-bit")
    # and equal to pydicom's own decoder, which masks to BitsStored
    ref = np.stack([pydicom.dcmread(p).pixel_array for p in paths]).astype(float)
    want = -241 if signed else 3855
    assert ref[0, 0, 0] == want
    truth = _canonical(ref.transpose(2, 1, 0), np.diag([-1.0, -1, 1, 1]) @ spec.lps_affine())
    assert_same_volumes(ours, [truth], "12-bit vs pydicom")


@pytest.mark.parametrize("step", [3.0, -3.0], ids=["ascending", "descending"])
def test_mosaic_time_series_like_dcm2niix(tmp_path, step):
    spec = _spec(n=7, iop=oblique(15, 0), slice_step=step)
    write_mosaic(spec, tmp_path / "src" / "ep2d", n_volumes=3)
    ours, report = _ours(tmp_path / "src", Workspace(tmp_path / "ws"))
    assert len(ours) == 3, report
    assert_same_volumes(ours, _dcm2niix(tmp_path / "src" / "ep2d", tmp_path / "d2n"), "mosaic")
    truth = [
        _canonical(
            volume_data(spec, v).transpose(2, 1, 0).astype(float),
            np.diag([-1.0, -1, 1, 1]) @ spec.lps_affine(),
        )  # fmt: skip
        for v in range(3)
    ]
    assert_same_volumes(ours, truth, "mosaic vs ground truth")


def test_on_4d_quarantine_applies_to_mosaic_series(tmp_path):
    write_mosaic(_spec(n=4), tmp_path / "src" / "ep2d", n_volumes=2)
    ours, report = _ours(tmp_path / "src", Workspace(tmp_path / "ws"), on_4d="quarantine")
    assert ours == []
    assert all(f["reason"].startswith("4D series (2 volumes") for f in report["files"])


def test_instance_order_is_no_evidence_without_instance_numbers(tmp_path):
    """GE-like 4D whose files lost their InstanceNumber: file names are no volume index."""
    paths = write_classic_4d(_spec(n=4), tmp_path / "src" / "ge", [{} for _ in range(3)])
    for p in paths:
        ds = pydicom.dcmread(p)
        del ds.InstanceNumber
        ds.save_as(p)
    ours, report = _ours(tmp_path / "src", Workspace(tmp_path / "ws"))
    assert ours == []
    assert all(
        f["reason"].startswith("4D series: 4 positions x 3 volumes") for f in report["files"]
    )


def test_enhanced_objects_of_one_frame_each_form_one_volume(tmp_path):
    """Exports that write each slice as its own one-frame enhanced object (Siemens XA
    interoperability-style): one stack across files, not one single-slice scan per file."""
    uid = pydicom.uid.generate_uid()
    for k in range(4):
        spec = _spec(n=1, seed=k, series_uid=uid, origin=(-100.0, -80.0, 40.0 + 2.5 * k))
        path = write_enhanced(spec, tmp_path / "src" / "xa" / f"{k}.dcm")
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = k + 1
        ds.save_as(path)
    ours, report = _ours(tmp_path / "src", Workspace(tmp_path / "ws"))
    assert len(ours) == 1 and ours[0][0].shape == (10, 12, 4), report
    assert_same_volumes(ours, _dcm2niix(tmp_path / "src" / "xa", tmp_path / "d2n"), "XA 1-frame")


def test_enhanced_object_still_typed_mosaic_is_read_as_its_frames(tmp_path):
    """Siemens XA30 cuts a mosaic's tiles into the frames of an enhanced object but leaves
    MOSAIC in ImageType (dcm2niix issue 553): the frames are slices, as dcm2niix reads them.
    A one-frame object typed MOSAIC still needs the mosaic's tile count (refused without)."""
    mosaic_type = ("ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC")
    write_enhanced(_spec(n=6, seed=5, image_type=mosaic_type), tmp_path / "src" / "xa30" / "a.dcm")
    ours, report = _ours(tmp_path / "src", Workspace(tmp_path / "ws"))
    assert len(ours) == 1 and ours[0][0].shape == (10, 12, 6), report
    assert_same_volumes(ours, _dcm2niix(tmp_path / "src" / "xa30", tmp_path / "d2n"), "XA30")

    nav = _spec(n=1, seed=6, image_type=mosaic_type)
    write_enhanced(nav, tmp_path / "one" / "nav.dcm")
    _, report = _ours(tmp_path / "one", Workspace(tmp_path / "ws1"))
    (only,) = report["files"]
    assert only["status"] == "quarantined" and "Siemens mosaic" in only["reason"]
