import csv
from collections import Counter

import nibabel as nib
import numpy as np
import pydicom

from medml.config import SynthConfig
from medml.synth import covid_ct, generate


def _labels(root):
    with (root / "labels.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_dataset_layout_labels_and_balance(tiny_raw, tiny_settings):
    rows = _labels(tiny_raw)
    assert len(rows) >= tiny_settings.synth.n_patients
    per_class = Counter(r["label"] for r in {r["patient_id"]: r for r in rows}.values())
    assert set(per_class) == set(covid_ct.CLASSES)
    assert max(per_class.values()) - min(per_class.values()) <= 1
    formats = {r["path"].split("/")[0] for r in rows}
    assert formats == {"dicom", "nifti"}
    for r in rows:
        assert (tiny_raw / r["path"]).exists()


def test_dicom_is_real_ct_with_identity_and_geometry(tiny_raw):
    row = next(r for r in _labels(tiny_raw) if r["path"].startswith("dicom"))
    files = sorted((tiny_raw / row["path"]).glob("*.dcm"))
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert ds.SeriesInstanceUID == row["series_uid"]
    assert str(ds.PatientID) == row["patient_id"]
    assert ds.PatientName and ds.PatientBirthDate and ds.AccessionNumber and ds.InstitutionName
    assert float(ds.RescaleIntercept) == -1024
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert hu.min() < -900 and hu.max() > 0  # air and tissue present
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    assert np.allclose(np.diff(sorted(z)), float(ds.SliceThickness), atol=1e-3)


def test_same_seed_same_bytes(tmp_path):
    cfg = SynthConfig(n_patients=3, seed=3, matrix=24, z_extent_mm=120, format="mixed")
    a, b = (
        generate(cfg, tmp_path / "a", progress=False),
        generate(cfg, tmp_path / "b", progress=False),
    )
    files_a = sorted(p.relative_to(a.out) for p in a.out.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.out) for p in b.out.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        if rel.suffix == ".dcm" or rel.name == "labels.csv":
            assert (a.out / rel).read_bytes() == (b.out / rel).read_bytes(), rel
        elif rel.name.endswith(".nii.gz"):
            assert np.array_equal(
                nib.load(a.out / rel).get_fdata(), nib.load(b.out / rel).get_fdata()
            )


def test_severity_raises_lung_density_but_classes_overlap():
    # Without nuisances (difficulty 0) the anatomy is fixed, so the mean HU of the chest box
    # can only rise through involved lung.
    cfg = SynthConfig(matrix=48, z_extent_mm=160, slice_thickness_mm=(8.0, 8.0), difficulty=0.0)
    means = []
    for label in range(len(covid_ct.CLASSES)):
        rng = np.random.default_rng(label)
        vol, _ = covid_ct.render_chest(covid_ct.ChestPatient.draw(label, cfg, rng), cfg, rng)
        means.append(float(vol[5:15, 14:34, 8:40].mean()))
    assert all(b > a + 20 for a, b in zip(means, means[1:])), means
    # Jitter crosses class borders: the drawn shares of adjacent classes overlap.
    cfg = cfg.model_copy(update={"difficulty": 1.0})
    rng = np.random.default_rng(0)
    s2 = [covid_ct.ChestPatient.draw(2, cfg, rng).share for _ in range(200)]
    s3 = [covid_ct.ChestPatient.draw(3, cfg, rng).share for _ in range(200)]
    assert max(s2) > min(s3)


def test_rerun_with_same_config_writes_nothing_and_new_config_replaces(tmp_path):
    cfg = SynthConfig(n_patients=2, seed=1, matrix=24, z_extent_mm=96)
    first = generate(cfg, tmp_path, progress=False)
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    again = generate(cfg, tmp_path, progress=False)
    assert again.n_studies == first.n_studies
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == stamp
    generate(cfg.model_copy(update={"format": "nifti", "n_patients": 1}), tmp_path, progress=False)
    assert not (tmp_path / "dicom").exists()
    assert len(list((tmp_path / "nifti").glob("*.nii.gz"))) == len(_labels(tmp_path))


def test_a_changed_generator_rewrites_the_dataset_of_the_same_config(tmp_path, monkeypatch):
    """The manifest names the generator's code too: data written by an older generator for
    the same config was served as current until deleted by hand."""
    import medml.synth as synth

    cfg = SynthConfig(n_patients=1, seed=1, matrix=24, z_extent_mm=96, format="nifti")
    generate(cfg, tmp_path, progress=False)
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.nii.gz")}
    monkeypatch.setattr(synth, "generator_version", lambda: "another-generator")
    generate(cfg, tmp_path, progress=False)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.nii.gz")} != stamp
    assert "another-generator" in (tmp_path / "synth.json").read_text()
