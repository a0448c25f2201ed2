"""MedMNIST 3D import, on the real AdrenalMNIST3D file in shared/ (and on small fakes)."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medml.catalog import Catalog
from medml.cli import app
from medml.config import PreprocessConfig, load_settings
from medml.data.transforms import deterministic_chain
from medml.importers.medmnist import INFO, MedMNISTError, dataset_name, import_medmnist
from medml.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
ADRENAL = ROOT.parent / "shared" / "data" / "medmnist" / "adrenalmnist3d.npz"
needs_adrenal = pytest.mark.skipif(not ADRENAL.exists(), reason=f"{ADRENAL} not present")


def _fake_npz(path: Path, size: int = 28, n: int = 4, n_classes: int = 3) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, size, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % n_classes).reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


@needs_adrenal
def test_adrenal_subset_keeps_splits_labels_and_volumes(tmp_path):
    ws = Workspace(tmp_path / "ws")
    result = import_medmnist(ADRENAL, ws, limit=12, progress=False)
    assert result.dataset == "adrenalmnist3d" and result.size == 28
    assert result.classes == ("normal", "hyperplasia")
    assert result.counts == {"train": 12, "val": 12, "test": 12} and result.written == 36

    data = np.load(ADRENAL)
    scans = Catalog(ws.catalog_url).list_scans()
    assert len(scans) == 36
    assert len({s["patient_key"] for s in scans}) == 36  # one patient key per volume
    for split in ("train", "val", "test"):
        rows = sorted((s for s in scans if s["split"] == split), key=lambda s: s["scan_id"])
        assert len(rows) == 12
        expected = [INFO["adrenalmnist3d"][1][int(v)] for v in data[f"{split}_labels"][:12, 0]]
        assert [r["label"] for r in rows] == expected
        first = rows[0]
        assert first["source_format"] == "medmnist" and first["modality"] == "CT"
        img = nib.load(ws.root / first["volume"])
        assert img.shape == (28, 28, 28) and np.allclose(img.affine, np.eye(4))
        assert np.array_equal(np.asarray(img.dataobj), data[f"{split}_images"][0])

    # The mask chain scales 0/255 to 0/1 without a CT window and keeps the whole crop.
    settings = load_settings(ROOT / "configs" / "adrenalmnist3d.yaml")
    out = deterministic_chain(settings.preprocess)({"image": str(ws.root / scans[0]["volume"])})
    x = out["image"]
    assert tuple(x.shape[1:]) == tuple(settings.preprocess.spatial_size)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0

    again = import_medmnist(ADRENAL, ws, limit=12, progress=False)  # idempotent
    assert again.written == 0 and len(Catalog(ws.catalog_url).list_scans()) == 36


def test_any_3d_set_by_file_name_including_64(tmp_path):
    npz = _fake_npz(tmp_path / "fracturemnist3d_64.npz", size=64, n=3)
    assert dataset_name(npz) == "fracturemnist3d"
    ws = Workspace(tmp_path / "ws")
    result = import_medmnist(npz, ws, progress=False)
    assert result.size == 64 and result.counts == {"train": 3, "val": 3, "test": 3}
    labels = {s["label"] for s in Catalog(ws.catalog_url).list_scans()}
    assert labels == set(INFO["fracturemnist3d"][1])


def test_bad_files_name_the_file_and_the_reason(tmp_path):
    unknown = _fake_npz(tmp_path / "mystery.npz")
    with pytest.raises(MedMNISTError, match="mystery.npz.*unknown MedMNIST 3D set"):
        import_medmnist(unknown, Workspace(tmp_path / "ws"), progress=False)
    too_many = _fake_npz(tmp_path / "nodulemnist3d.npz", n_classes=3)  # binary set
    with pytest.raises(MedMNISTError, match="labels outside 0..1"):
        import_medmnist(too_many, Workspace(tmp_path / "ws"), progress=False)
    broken = tmp_path / "organmnist3d.npz"
    broken.write_bytes(b"not a zip")
    with pytest.raises(MedMNISTError, match="organmnist3d.npz: not a MedMNIST .npz"):
        import_medmnist(broken, Workspace(tmp_path / "ws"), progress=False)


def test_cli_imports_and_rejects(tmp_path):
    npz = _fake_npz(tmp_path / "vesselmnist3d.npz", n=2, n_classes=2)
    runner = CliRunner()
    ok = runner.invoke(app, ["import-medmnist", str(npz), "--workspace", str(tmp_path / "ws")])
    assert ok.exit_code == 0, ok.output
    assert "imported vesselmnist3d" in ok.output and "train 2" in ok.output
    bad = runner.invoke(app, ["import-medmnist", str(_fake_npz(tmp_path / "x.npz"))])
    assert bad.exit_code == 2


def test_mask_modality_config_validates():
    assert PreprocessConfig(modality="mask").modality == "mask"
    settings = load_settings(ROOT / "configs" / "adrenalmnist3d.yaml")
    assert settings.evaluate.ordinal is False and settings.preprocess.pixdim == (1.0, 1.0, 1.0)
