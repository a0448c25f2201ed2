"""Training: resume after a real kill, DDP under torchrun, early stopping, logged figures."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import fit_and_package
from mlflow import MlflowClient

from medml.catalog import Catalog
from medml.tracking import configure
from medml.train import checkpoint
from medml.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "medml.cli", "train", "--config", str(ROOT / "configs" / "tiny.yaml")]


def _copy(ws: Workspace, dest: Path) -> Workspace:
    shutil.copytree(ws.root, dest)
    for sub in ("checkpoints", "mlartifacts"):
        shutil.rmtree(dest / sub, ignore_errors=True)
    (dest / "mlflow.db").unlink(missing_ok=True)
    return Workspace(dest).ensure()


def _last_state(ws: Workspace) -> dict:
    (path,) = ws.checkpoints.glob("*/last.pt")
    return checkpoint.load(path)


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path, ingested):
    epochs = ["--set", "train.epochs=5"]
    whole = _copy(ingested, tmp_path / "whole")
    subprocess.run([*CLI, "--workspace", str(whole.root), *epochs], check=True, capture_output=True)

    killed = _copy(ingested, tmp_path / "killed")
    proc = subprocess.Popen(
        [*CLI, "--workspace", str(killed.root), *epochs],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline:
        lasts = list(killed.checkpoints.glob("*/last.pt"))
        if lasts and checkpoint.load(lasts[0])["progress"]["epoch"] >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = _last_state(killed)["progress"]
    assert not at_kill["finished"] and at_kill["epoch"] < 5

    subprocess.run(
        [*CLI, "--workspace", str(killed.root), *epochs, "--resume"],
        check=True,
        capture_output=True,
    )
    a, b = _last_state(whole), _last_state(killed)
    assert b["progress"]["finished"] and b["progress"]["epoch"] == 5
    assert a["run_id"] != b["run_id"]
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key


def test_ddp_two_processes_one_epoch(tmp_path, ingested):
    ws = _copy(ingested, tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "medml.cli",
        "train",
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        "--workspace",
        str(ws.root),
        "--set",
        "train.epochs=1",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"run_id"' in done.stdout.splitlines()[-1]
    configure(ws)
    runs = MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()]
    )
    assert [r.data.params["world_size"] for r in runs] == ["2"]


def test_early_stopping_checkpoints_and_figures(tmp_path, ingested, tiny_settings):
    ws = _copy(ingested, tmp_path / "es")
    settings = tiny_settings.model_copy(
        update={
            "train": tiny_settings.train.model_copy(
                update={"epochs": 30, "early_stopping_patience": 1}
            )
        }
    )
    result = fit_and_package(settings, ws)
    state = _last_state(ws)["progress"]
    assert state["finished"] and state["epoch"] < 30
    assert state["epoch"] - state["best_epoch"] == 1
    assert result.checkpoint.exists()
    configure(ws)
    client = MlflowClient()
    files = {f.path for f in client.list_artifacts(result.run_id, "figures")}
    assert {"figures/confusion_test.png", "figures/retrieval_test.png"} <= files
    history = client.get_metric_history(result.run_id, "volumes_per_s")
    assert len(history) == state["epoch"] and all(m.value > 0 for m in history)


@pytest.mark.parametrize("backbone", ["resnet18", "densenet121", "efficientnet-b0", "seresnet50"])
def test_other_backbones_train_one_step(backbone):
    from medml.config import LossConfig, ModelConfig
    from medml.losses import build_loss
    from medml.models.encoder import build_encoder
    from medml.train.trainer import MetricModel

    model = MetricModel(
        build_encoder(ModelConfig(backbone=backbone, embedding_dim=8)),
        build_loss(LossConfig(name="softmax"), 2, 8),
    )
    loss = model(torch.randn(4, 1, 32, 32, 32), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    assert torch.isfinite(loss)


def test_initial_weights_load_safely(tmp_path):
    from medml.config import ModelConfig
    from medml.models.encoder import build_encoder

    source = build_encoder(ModelConfig())
    path = tmp_path / "medicalnet.pth"
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in source.backbone.state_dict().items()}}, path
    )
    loaded = build_encoder(ModelConfig(init_weights=path))
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(value, loaded.backbone.state_dict()[key])
    bad = tmp_path / "other.pth"
    torch.save({"unrelated": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="no tensor matches"):
        build_encoder(ModelConfig(init_weights=bad))


def test_batch_augmentation_is_seeded_flips_left_right_and_can_be_off():
    from medml.config import AugmentConfig
    from medml.data.augment import BatchAugment

    x = torch.rand(6, 1, 12, 12, 12)
    aug = BatchAugment(AugmentConfig())
    a = aug(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, aug(x, torch.Generator().manual_seed(4)))
    off = BatchAugment(AugmentConfig(enabled=False))
    assert off(x, torch.Generator()) is x
    flip_only = BatchAugment(AugmentConfig(prob=0.0, flip_lr=True))
    out = flip_only(x, torch.Generator().manual_seed(0))
    for i in range(len(x)):
        assert torch.allclose(out[i], x[i], atol=1e-5) or torch.allclose(
            out[i], x[i].flip(1), atol=1e-5
        )


def test_the_same_data_trains_the_same_in_any_workspace(
    tmp_path, tiny_raw, tiny_settings, monkeypatch
):
    """Two workspaces, two de-identification secrets (so different scan ids and patient keys):
    the same split, batches, weights and test metrics."""
    from medml.ingest import ingest

    settings = tiny_settings.model_copy(
        update={"train": tiny_settings.train.model_copy(update={"epochs": 1})}
    )
    results = []
    for secret in ("first-secret", "second-secret"):
        monkeypatch.setenv("MEDML_DEID_SECRET", secret)
        ws = Workspace(tmp_path / secret).ensure()
        ingest(tiny_raw, ws, tiny_raw / "labels.csv", tiny_settings.ingest, progress=False)
        results.append((fit_and_package(settings, ws), ws))
    (first, ws1), (second, ws2) = results
    ids1 = {s["scan_id"] for s in Catalog(ws1.catalog_url).list_scans()}
    assert not ids1 & {s["scan_id"] for s in Catalog(ws2.catalog_url).list_scans()}
    splits = [
        sorted((s["content_hash"], s["split"]) for s in Catalog(w.catalog_url).list_scans())
        for w in (ws1, ws2)
    ]
    assert splits[0] == splits[1]
    weights = [torch.load(r.checkpoint, weights_only=True) for r in (first, second)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert first.metrics["accuracy"] == second.metrics["accuracy"]
