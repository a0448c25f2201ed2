"""Cirrhosis MRI phantoms, novel classes, acquisition planes, and the DICOM geometry they need."""

import csv
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medml.config import SynthConfig
from medml.synth import GENERATORS, cirrhosis_mri, class_names, covid_ct, generate
from medml.synth.phantom import Grid

SMALL = {"matrix": 24, "z_extent_mm": 96.0, "slice_thickness_mm": (8.0, 12.0)}
DCM2NIIX = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")


def _labels(root):
    with (root / "labels.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_mri_with_novel_classes_is_balanced_and_labelled(tmp_path):
    cfg = SynthConfig(kind="cirrhosis-mri", n_patients=16, seed=2, novel=True, **SMALL)
    generate(cfg, tmp_path, progress=False)
    rows = _labels(tmp_path)
    per_patient = {r["patient_id"]: r for r in rows}.values()
    counts = Counter(r["label"] for r in per_patient)
    assert set(counts) == set(cirrhosis_mri.CLASSES + cirrhosis_mri.NOVEL_CLASSES)
    assert set(counts.values()) == {2}
    for r in rows:
        assert r["class_set"] == ("base" if r["label"] in cirrhosis_mri.CLASSES else "novel")
        assert r["modality"] == "MR"
        assert (tmp_path / r["path"]).exists()
    dcm = next(r for r in rows if r["path"].startswith("dicom"))
    ds = pydicom.dcmread(next((tmp_path / dcm["path"]).glob("*.dcm")))
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.Modality == "MR"
    assert ds.SeriesDescription.split()[0] in ("T1", "T2") and float(ds.EchoTime) > 0
    assert ds.pixel_array.max() > 0


def test_without_novel_only_base_classes(tmp_path):
    cfg = SynthConfig(kind="covid-ct", n_patients=5, seed=1, format="nifti", **SMALL)
    assert class_names(cfg) == covid_ct.CLASSES
    generate(cfg, tmp_path, progress=False)
    assert {r["class_set"] for r in _labels(tmp_path)} == {"base"}


def test_mri_same_seed_same_bytes(tmp_path):
    cfg = SynthConfig(kind="cirrhosis-mri", n_patients=3, seed=5, format="dicom", **SMALL)
    a = generate(cfg, tmp_path / "a", progress=False).out
    b = generate(cfg, tmp_path / "b", progress=False).out
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    other = generate(cfg.model_copy(update={"seed": 6}), tmp_path / "c", progress=False).out
    assert (a / "labels.csv").read_bytes() != (other / "labels.csv").read_bytes()


@pytest.mark.parametrize("kind", list(GENERATORS))
def test_every_novel_finding_changes_the_image(kind):
    gen = GENERATORS[kind]
    cfg = SynthConfig(
        kind=kind,
        difficulty=0.0,
        novel=True,
        matrix=32,
        z_extent_mm=160,
        slice_thickness_mm=(8.0, 8.0),
        weightings=("T2",),
        planes=(1, 0, 0),
    )
    rng = np.random.default_rng(0)
    base, _ = gen.render(gen.draw(0, cfg, rng), cfg, np.random.default_rng(1))
    for label in range(len(gen.CLASSES), len(gen.ALL_CLASSES)):
        vol, _ = gen.render(gen.draw(label, cfg, rng), cfg, np.random.default_rng(1))
        changed = np.abs(vol - base) > 0.05 * np.abs(base).max()
        assert changed.sum() >= 8, gen.ALL_CLASSES[label]  # a small nodule is a few voxels


def test_ct_novel_classes_are_five_drawn_and_labelled(tmp_path):
    # 5-way episodes on classes never trained on need five novel classes, each written.
    assert len(covid_ct.NOVEL_CLASSES) == 5
    cfg = SynthConfig(kind="covid-ct", n_patients=10, seed=3, novel=True, format="nifti", **SMALL)
    generate(cfg, tmp_path, progress=False)
    novel = {r["label"] for r in _labels(tmp_path) if r["class_set"] == "novel"}
    assert novel == set(covid_ct.NOVEL_CLASSES)


@pytest.mark.parametrize("finding", covid_ct.NOVEL_CLASSES)
def test_each_ct_finding_is_visible_in_the_tensor_the_encoder_sees(tmp_path, finding):
    """At its smallest extent, each finding still changes the demo's 6 mm, 32^3 tensor, and
    stays a plausible finding (not most of the chest)."""
    import dataclasses

    from medml.config import PreprocessConfig
    from medml.data.transforms import KEY, deterministic_chain
    from medml.synth.writers import write_nifti

    cfg = SynthConfig(kind="covid-ct", difficulty=0.0, novel=True, slice_thickness_mm=(6.0, 6.0))
    chain = deterministic_chain(PreprocessConfig(pixdim=(6.0, 6.0, 6.0), spatial_size=(32,) * 3))

    def tensor(label: int) -> np.ndarray:
        # difficulty 0 and one render seed: the same body, lungs and vessels for both
        p = dataclasses.replace(covid_ct.draw(label, cfg, np.random.default_rng(0)), severity=0.4)
        vol, grid = covid_ct.render(p, cfg, np.random.default_rng(1))
        write_nifti(vol, grid, tmp_path / f"{label}.nii.gz")
        return np.asarray(chain({KEY: str(tmp_path / f"{label}.nii.gz")})[KEY])[0]

    diff = np.abs(tensor(covid_ct.ALL_CLASSES.index(finding)) - tensor(0))
    changed = diff > 0.05  # 75 HU of the 1500 HU window
    assert changed.sum() >= 10, finding  # the smallest nodule is a handful of 6 mm voxels
    assert changed.mean() < 0.15, finding


def test_mri_stages_overlap_but_stage_effects_grow():
    cfg = SynthConfig(kind="cirrhosis-mri")
    rng = np.random.default_rng(0)
    stages = [[cirrhosis_mri.draw(k, cfg, rng).stage for _ in range(200)] for k in range(5)]
    for lo, hi in zip(stages, stages[1:]):
        assert np.median(lo) < np.median(hi)
        assert max(lo) > min(hi)  # adjacent stages are confusable
    clean = cfg.model_copy(update={"overlap": 0.0})
    assert all(abs(cirrhosis_mri.draw(3, clean, rng).stage - 3) <= 0.3 for _ in range(50))
    # F4 on T2: ascites (bright fluid) and septa raise the bright share of the abdomen.
    flat = cfg.model_copy(
        update={"difficulty": 0.0, "weightings": ("T2",), "planes": (1, 0, 0), "matrix": 48}
    )
    bright = []
    for k in (0, 4):
        p = cirrhosis_mri.draw(k, flat, np.random.default_rng(3))
        vol, _ = cirrhosis_mri.render(p, flat, np.random.default_rng(4))
        bright.append(float((vol > 1.1 * 1000).mean()))
    assert bright[1] > bright[0] + 0.002, bright


def _single_plane_pair(tmp_path, plane: str):
    weights = {"axial": (1, 0, 0), "coronal": (0, 1, 0), "oblique": (0, 0, 1)}[plane]
    cfg = SynthConfig(
        kind="cirrhosis-mri",
        n_patients=1,
        seed=11,
        planes=weights,
        followup_fraction=0.0,
        format="dicom",
        **SMALL,
    )
    dcm = generate(cfg, tmp_path / "dcm", progress=False).out
    nii = generate(cfg.model_copy(update={"format": "nifti"}), tmp_path / "nii", progress=False)
    series = dcm / _labels(dcm)[0]["path"]
    return series, nii.out / _labels(nii.out)[0]["path"]


@pytest.mark.parametrize("plane", ["axial", "coronal", "oblique"])
def test_dicom_geometry_matches_nifti_in_every_plane(tmp_path, plane):
    series, nifti_path = _single_plane_pair(tmp_path, plane)
    files = sorted(series.glob("*.dcm"))
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    iop = np.array(heads[0].ImageOrientationPatient, dtype=float)
    expected_iop = {"axial": [1, 0, 0, 0, 1, 0], "coronal": [1, 0, 0, 0, 0, -1]}.get(plane)
    if expected_iop:
        assert np.allclose(iop, expected_iop)
    else:  # oblique: tilted, still orthonormal
        assert not np.allclose(np.abs(iop), [1, 0, 0, 0, 1, 0], atol=0.05)
    assert np.isclose(iop[:3] @ iop[3:], 0, atol=1e-5)
    normal = np.cross(iop[:3], iop[3:])
    pos = np.array([np.array(h.ImagePositionPatient, dtype=float) for h in heads])
    steps = np.diff(pos, axis=0)  # each slice moves one spacing along the normal, nothing else
    assert np.allclose(steps, normal * float(heads[0].SpacingBetweenSlices), atol=1e-3)

    # The NIfTI written for the same study has the same voxel -> RAS mapping.
    img = nib.load(nifti_path)
    lps = np.diag([-1, -1, 1, 1]) @ img.affine
    ps = np.array(heads[0].PixelSpacing, dtype=float)
    assert np.allclose(lps[:3, 0], iop[:3] * ps[1], atol=1e-4)
    assert np.allclose(lps[:3, 1], iop[3:] * ps[0], atol=1e-4)
    assert np.allclose(lps[:3, 3], pos[0], atol=1e-3)

    if not Path(DCM2NIIX).exists():
        pytest.skip("dcm2niix not installed")
    out = tmp_path / "conv"
    out.mkdir()
    subprocess.run(
        [DCM2NIIX, "-z", "y", "-f", "vol", "-o", str(out), str(series)],
        check=True,
        capture_output=True,
    )
    conv = nib.as_closest_canonical(nib.load(next(out.glob("*.nii.gz"))))
    ours = nib.as_closest_canonical(img)
    assert conv.shape == ours.shape
    assert np.allclose(conv.affine, ours.affine, atol=1e-2), (conv.affine, ours.affine)
    assert np.allclose(conv.get_fdata(), ours.get_fdata(), atol=1.0)


def test_grid_affine_and_positions_agree():
    from medml.synth.cirrhosis_mri import _oblique_iop

    iop = _oblique_iop(np.random.default_rng(0), 20, 30)
    g = Grid.centred(16, 200.0, 10, 5.0, iop)
    aff = g.lps_affine()
    for k in (0, 3, 9):
        assert np.allclose(aff @ [0, 0, k, 1], [*g.position(k), 1])
    z, y, x = g.coords()
    assert np.allclose([x[4, 5, 6], y[4, 5, 6], z[4, 5, 6]], (aff @ [6, 5, 4, 1])[:3], atol=1e-3)
    assert np.allclose(aff @ [7.5, 7.5, 4.5, 1], [0, 0, 0, 1], atol=1e-6)  # centred


@pytest.mark.parametrize("planes", [(1, 0, 0), (0, 1, 0), (0, 0, 1)])
def test_boxed_ellipsoids_match_full_evaluation(planes):
    from medml.synth.phantom import ellipsoid, ellipsoid_in, rotate_xy

    cfg = SynthConfig(kind="cirrhosis-mri", matrix=32, planes=planes)
    p = cirrhosis_mri.draw(2, cfg, np.random.default_rng(5))
    grid = Grid.centred(cfg.matrix, p.fov_mm, 20, p.slice_thickness, p.iop)
    z, y, x = grid.coords()
    x, y = rotate_xy(x - p.shift[2], y - p.shift[1], p.rotation_deg)
    z, y, x = np.broadcast_arrays(z - p.shift[0], y, x)
    to_index = cirrhosis_mri._to_index(grid, p)
    assert np.allclose(to_index @ [z[7, 11, 19], y[7, 11, 19], x[7, 11, 19], 1], [7, 11, 19, 1])
    full = ellipsoid(z, y, x, (25, 10, -50), (80, 70, 80))
    boxed = ellipsoid_in(grid.shape, to_index, (z, y, x), (25, 10, -50), (80, 70, 80))
    near = full <= 1.5
    assert near.any() and np.allclose(full[near], boxed[near], atol=1e-5)
    assert (boxed[~near] > 1.5).all()


def test_cli_synth_mri_novel_messy(tmp_path):
    from typer.testing import CliRunner

    from medml.cli import app

    args = [
        "synth",
        "cirrhosis-mri",
        "--out",
        str(tmp_path),
        "--n-patients",
        "2",
        "--novel",
        "--messy",
        "--format",
        "dicom",
        "--set",
        "synth.matrix=20",
        "--set",
        "synth.z_extent_mm=80",
        "--set",
        "synth.slice_thickness_mm=[10,10]",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "expected_ingest.json").exists() and (tmp_path / "README.txt").exists()
    assert {r["modality"] for r in _labels(tmp_path)} == {"MR"}
    bad = CliRunner().invoke(app, ["synth", "mri", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2
    nifti_messy = CliRunner().invoke(
        app,
        [
            "synth",
            "covid-ct",
            "--out",
            str(tmp_path / "y"),
            "--n-patients",
            "1",
            "--format",
            "nifti",
            "--messy",
            "--set",
            "synth.matrix=20",
        ],
    )
    assert nifti_messy.exit_code == 2 and "needs at least one DICOM study" in nifti_messy.output
