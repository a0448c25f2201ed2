"""Planning apart from execution: fingerprint, rules, plans.json, resolve, CLI, cache keys.

Real NIfTI volumes written with nibabel into a real catalog; MedMNIST-style .npz imported with
the real importer; real MLflow (SQLite in tmp).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
from prefect.cache_policies import CacheKeyFnPolicy
from typer.testing import CliRunner

from flows import tasks
from medml.catalog import Catalog
from medml.cli import app
from medml.config import PlanConfig, load_settings
from medml.importers.medmnist import import_medmnist
from medml.planning import (
    EMPTY_CATALOG,
    PlanningError,
    fingerprint,
    make_plans,
    plan_workspace,
    planned_updates,
    plans_path,
    read_plans,
    resolve,
    write_plans,
)
from medml.planning.fingerprint import foreground
from medml.planning.rules import fit_memory
from medml.tracking import configure, log_plans, use_experiment
from medml.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
BODY, LUNG, AIR = 40.0, -850.0, -1024.0


def _ct_volume(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Padding (-1024) around a body box of soft tissue and bone, with a 'lung' inside it."""
    rng = np.random.default_rng(seed)
    vol = np.full(shape, AIR, dtype=np.float32)
    vol[2:-2, 2:-2, :] = rng.normal(BODY, 30.0, (shape[0] - 4, shape[1] - 4, shape[2]))
    vol[2:4, 2:-2, :] = 700.0 + seed  # a bone wall: the top of the intensity range
    vol[5:-5, 5:-5, :] = LUNG  # enclosed by the body in every axial slice
    return vol.round()


def _hand_catalog(root: Path, geometry: list[tuple[tuple[int, int, int], tuple]]) -> Workspace:
    """One real NIfTI per (shape, spacing) and a catalog row each (labels a/b, split train)."""
    ws = Workspace(root).ensure()
    catalog = Catalog(ws.catalog_url)
    for i, (shape, spacing) in enumerate(geometry):
        volume = _ct_volume(shape, i)
        img = nib.Nifti1Image(volume, np.diag([*spacing, 1.0]))
        rel = f"volumes/s{i}.nii.gz"
        nib.save(img, ws.root / rel)
        catalog.upsert_scan(
            {
                "scan_id": f"s{i}",
                "patient_key": f"p{i}",
                "modality": "CT",
                "shape": ",".join(map(str, shape)),
                "spacing": ",".join(f"{z:.4f}" for z in spacing),
                "content_hash": f"h{i}",
                "label": "ab"[i % 2],
                "split": "train",
                "volume": rel,
            }
        )
    return ws


GEOMETRY = [
    ((16, 16, 8), (1.0, 1.0, 3.0)),
    ((20, 16, 10), (0.8, 1.0, 2.5)),
    ((16, 24, 12), (1.2, 1.0, 2.0)),
]


@pytest.fixture()
def hand_ws(tmp_path) -> Workspace:
    return _hand_catalog(tmp_path / "ws", GEOMETRY)


def _fake_medmnist(path: Path, binary: bool, n: int = 4) -> Path:
    rng = np.random.default_rng(1)
    arrays = {}
    for split in ("train", "val", "test"):
        if binary:  # a blob of 255 in zeros, like AdrenalMNIST3D's shape masks
            images = np.zeros((n, 28, 28, 28), dtype=np.uint8)
            images[:, 8:20, 9:19, 10:18] = 255
        else:
            images = rng.integers(0, 256, (n, 28, 28, 28), dtype=np.uint8)
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


def test_fingerprint_equals_hand_computation(hand_ws):
    cfg = PlanConfig(voxels_per_volume=10_000)  # more than any body here: every voxel is used
    fp = fingerprint(hand_ws, Catalog(hand_ws.catalog_url), cfg)
    spacings = np.array([g[1] for g in GEOMETRY])
    shapes = np.array([g[0] for g in GEOMETRY], dtype=float)
    assert fp.n_scans == 3 and fp.sampled == 3 and fp.modalities == {"CT": 3}
    assert np.allclose(fp.spacing.median, np.median(spacings, axis=0))
    assert np.allclose(fp.spacing.p10, np.percentile(spacings, 10, axis=0))
    assert np.allclose(fp.shape.median, np.median(shapes, axis=0))
    assert np.allclose(fp.extent_mm.median, np.median(shapes * spacings, axis=0))
    assert fp.class_counts == {"train": {"a": 2, "b": 1}}
    assert fp.binary == {"CT": False}

    # foreground = the body box with its enclosed lung; the padding around it is left out
    body = [_ct_volume(shape, i)[2:-2, 2:-2, :].ravel() for i, (shape, _) in enumerate(GEOMETRY)]
    pooled = np.concatenate(body)
    stats = fp.intensity["CT"]
    assert stats.voxels == pooled.size
    p_lo, p_mid, p_hi = np.percentile(pooled, [0.5, 50, 99.5])
    assert (stats.p00_5, stats.p50, stats.p99_5) == pytest.approx((p_lo, p_mid, p_hi), abs=1e-3)
    assert stats.p00_5 == LUNG  # the lung counts (holes filled), the -1024 padding does not


def test_ct_window_spacing_and_size_follow_the_rules(hand_ws):
    fp = fingerprint(hand_ws, Catalog(hand_ws.catalog_url), PlanConfig(voxels_per_volume=10_000))
    plans = make_plans(fp, memory_gb=8.0)
    stats = fp.intensity["CT"]
    assert plans.modality == "CT"
    assert plans.window == (round(stats.p00_5), round(stats.p99_5))
    assert plans.pixdim == pytest.approx(fp.spacing.median) and not plans.anisotropic
    size = np.array(fp.extent_mm.median) / np.array(plans.pixdim)  # (16, 16.7, 10) voxels
    assert plans.spatial_size == tuple(int(4 * round(v / 4)) for v in size) == (16, 16, 8)
    assert plans.batch_size == 3  # plenty of memory: capped by the three labelled scans
    assert plans.foreground_threshold is None and plans.memory_source == "given"


def test_anisotropic_axis_takes_the_10th_percentile_spacing(tmp_path):
    # thin in-plane, thick and few slices on z: nnU-Net's rule picks p10 of the z spacings
    geometry = [((64, 64, n), (0.8, 0.8, z)) for n, z in [(8, 4.0), (6, 6.0), (5, 8.0), (4, 10.0)]]
    ws = _hand_catalog(tmp_path / "ws", geometry)
    fp = fingerprint(ws, Catalog(ws.catalog_url))
    plans = make_plans(fp, memory_gb=8.0)
    assert plans.anisotropic
    zs = [g[1][2] for g in geometry]
    assert plans.pixdim == pytest.approx((0.8, 0.8, np.percentile(zs, 10)), abs=1e-4)
    assert np.median(zs) > plans.pixdim[2] > min(zs)


def test_memory_caps_the_spatial_size_then_the_batch():
    cfg = PlanConfig(bytes_per_voxel=100.0, min_batch_size=8, max_batch_size=32)
    size = np.array([96.0, 96.0, 40.0])
    roomy, batch = fit_memory(size, 2**40, cfg, n_labelled=1000)
    assert roomy == (96, 96, 40) and batch == 32
    budget = 8 * 64**3 * 100.0  # exactly eight 64^3 scans
    spatial, batch = fit_memory(size, budget, cfg, n_labelled=1000)
    assert all(v % 8 == 0 for v in spatial) and spatial[0] < 96
    assert 8 * math.prod(spatial) * 100.0 <= budget and batch >= 8
    assert batch == int(budget // (math.prod(spatial) * 100.0))


def test_too_little_memory_is_said_not_hidden(hand_ws):
    fp = fingerprint(hand_ws, Catalog(hand_ws.catalog_url))
    plans = make_plans(fp, memory_gb=1e-6)
    assert plans.spatial_size == (4, 4, 4) and plans.batch_size == 2
    assert any("do not fit 8 scans" in n for n in plans.notes)


def test_binary_volumes_are_planned_as_masks(tmp_path):
    ws = Workspace(tmp_path / "ws")
    import_medmnist(_fake_medmnist(tmp_path / "adrenalmnist3d.npz", binary=True), ws)
    plans, path = plan_workspace(ws, memory_gb=4.0)
    assert path == plans_path(ws) and path.exists()
    assert plans.fingerprint.modalities == {"CT": 12}  # the catalog says CT, the voxels say mask
    assert plans.modality == "mask" and plans.window is None
    assert plans.foreground_threshold == -1.0
    assert plans.pixdim == (1.0, 1.0, 1.0) and plans.spatial_size == (28, 28, 28)
    assert plans.class_counts == {
        s: {"hyperplasia": 2, "normal": 2} for s in ("test", "train", "val")
    }
    assert any("binary" in n for n in plans.notes)

    other = Workspace(tmp_path / "ws2")  # grey values: not a mask, so a CT window
    import_medmnist(_fake_medmnist(tmp_path / "organmnist3d.npz", binary=False), other)
    grey, _ = plan_workspace(other, memory_gb=4.0)
    assert grey.modality == "CT" and grey.window is not None and grey.foreground_threshold is None


def test_plans_round_trip_atomically_and_refuse_other_versions(hand_ws):
    plans, path = plan_workspace(hand_ws, memory_gb=4.0)
    assert read_plans(hand_ws) == plans
    assert [p.name for p in hand_ws.root.iterdir() if p.name.startswith(".plans")] == []
    raw = json.loads(path.read_text())
    raw["version"] = 99
    path.write_text(json.dumps(raw))
    with pytest.raises(PlanningError, match="version 99.*run `medml plan` again"):
        read_plans(hand_ws)
    path.write_text("{not json")
    with pytest.raises(PlanningError, match="unreadable"):
        read_plans(hand_ws)


def test_load_settings_keeps_which_keys_were_set(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preprocess: {window: [-1000, 400]}\ntrain: {epochs: 3}\n")
    settings = load_settings(cfg, ["preprocess.pixdim=[2, 2, 2]"])
    assert settings.preprocess.model_fields_set == {"window", "pixdim"}
    assert settings.train.model_fields_set == {"epochs"}
    assert load_settings(None).preprocess.model_fields_set == set()


def test_resolve_fills_only_what_the_config_left_unset(hand_ws):
    plans = make_plans(fingerprint(hand_ws, Catalog(hand_ws.catalog_url)), memory_gb=4.0)
    write_plans(hand_ws, plans)

    blank = load_settings(None)
    filled = resolve(blank, hand_ws)
    assert filled.preprocess.pixdim == plans.pixdim
    assert filled.preprocess.spatial_size == plans.spatial_size
    assert filled.preprocess.window == plans.window and filled.preprocess.modality == "CT"
    assert filled.train.batch_size == plans.batch_size
    assert filled.preprocess.foreground_threshold == blank.preprocess.foreground_threshold
    assert filled.preprocess.model_fields_set == set()  # still: nothing was set by the user
    assert resolve(filled, hand_ws) == filled  # idempotent

    mine = load_settings(None, ["preprocess.pixdim=[2, 2, 4]", "preprocess.window=[-1150, 350]"])
    kept = resolve(mine, hand_ws)
    assert kept.preprocess.pixdim == (2.0, 2.0, 4.0) and kept.preprocess.window == (-1150, 350)
    assert kept.preprocess.model_fields_set == {"pixdim", "window"}
    # the spatial size is planned for the user's pixdim, not the plans' own
    extent = np.array(plans.fingerprint.extent_mm.median)
    assert kept.preprocess.spatial_size == tuple(
        int(4 * max(1, round(v / 4))) for v in extent / np.array([2.0, 2.0, 4.0])
    )

    demo = load_settings(ROOT / "configs" / "demo.yaml")  # sets every planned key itself
    assert resolve(demo, hand_ws) == demo
    assert planned_updates(demo, plans) == {"preprocess": {}, "train": {}}

    mr = resolve(load_settings(None, ["preprocess.modality=MR"]), hand_ws)
    assert mr.preprocess.window == blank.preprocess.window  # no CT window for an MR chain


def test_without_plans_settings_are_unchanged(tmp_path):
    settings = load_settings(None)
    assert resolve(settings, Workspace(tmp_path / "none")) is settings
    assert not (tmp_path / "none").exists()


def test_cli_plans_the_ingested_ct(tmp_path, ingested):
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(ingested.root, ws.root)
    result = CliRunner().invoke(app, ["plan", "--workspace", str(ws.root), "--memory-gb", "4"])
    assert result.exit_code == 0, result.output
    assert "modality     CT: window [" in result.output and str(plans_path(ws)) in result.output
    plans = read_plans(ws)
    scans = Catalog(ws.catalog_url).list_scans(labelled=False)
    spacing = np.array([[float(v) for v in s["spacing"].split(",")] for s in scans])
    assert plans.pixdim == pytest.approx(np.median(spacing, axis=0), abs=1e-3)
    assert plans.window[0] < -500 < 0 < plans.window[1]  # lung to bone, from the body's voxels
    assert plans.fingerprint.n_scans == len(scans)


def test_cli_refuses_a_missing_or_empty_workspace_without_creating_it(tmp_path):
    missing = tmp_path / "missing"
    result = CliRunner().invoke(app, ["plan", "--workspace", str(missing)])
    words = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())  # unwrap typer's box
    assert result.exit_code == 2 and "does not exist: run `medml ingest`" in words
    assert not missing.exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["plan", "--workspace", str(empty)])
    assert result.exit_code == 1 and EMPTY_CATALOG in result.output
    assert list(empty.iterdir()) == []  # no catalog.db, no plans.json

    Catalog(Workspace(empty).catalog_url)  # a catalog without scans
    result = CliRunner().invoke(app, ["plan", "--workspace", str(empty)])
    assert result.exit_code == 1 and EMPTY_CATALOG in result.output
    assert not plans_path(Workspace(empty)).exists()


def _key(task, **params):
    policy = next(p for p in task.cache_policy.policies if isinstance(p, CacheKeyFnPolicy))
    return policy.cache_key_fn(None, params)


def test_plan_and_preprocess_cache_keys_follow_the_plans(hand_ws):
    settings = load_settings(None)
    p = {"settings": settings, "workspace": str(hand_ws.root)}
    plan_key = _key(tasks.plan, **p)
    assert _key(tasks.plan, **p) == plan_key
    assert _key(tasks.plan, **{**p, "settings": load_settings(None, ["plan.seed=1"])}) != plan_key

    before = _key(tasks.preprocess, **p)
    plans, _ = plan_workspace(hand_ws, memory_gb=4.0)
    planned = _key(tasks.preprocess, **p)
    assert planned != before  # the plans changed what preprocessing would produce
    write_plans(hand_ws, plans.model_copy(update={"pixdim": (9.0, 9.0, 9.0)}))
    assert _key(tasks.preprocess, **p) != planned
    demo = {**p, "settings": load_settings(ROOT / "configs" / "demo.yaml")}
    assert _key(tasks.preprocess, **demo) == _key(tasks.preprocess, **demo)


def test_plans_are_logged_to_mlflow(tmp_path, hand_ws):
    plans, _ = plan_workspace(hand_ws, memory_gb=4.0)
    ws = Workspace(tmp_path / "track").ensure()
    configure(ws)
    use_experiment(ws, "plans")
    updates = planned_updates(load_settings(None), plans)
    with mlflow.start_run() as run:
        log_plans(plans, updates)
    logged = mlflow.get_run(run.info.run_id)
    assert logged.data.params["plans.modality"] == "CT"
    assert logged.data.params["plans.batch_size"] == str(plans.batch_size)
    assert "preprocess.pixdim" in logged.data.tags["medml.from_plans"]
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="plans.json")
    assert json.loads(Path(local).read_text())["pixdim"] == list(plans.pixdim)


def test_foreground_rule_per_modality():
    cfg = PlanConfig()
    mr = np.zeros((6, 6, 2))
    mr[1:5, 1:5] = 10.0
    assert foreground(mr, "MR", cfg).sum() == 32
    ct = np.full((7, 7, 1), -1000.0)
    ct[1:6, 1:6] = 50.0
    ct[3, 3] = -900.0  # enclosed air: a lung
    assert foreground(ct, "CT", cfg).sum() == 25


def test_plan_task_runs_in_a_flow_caches_and_redoes_deleted_plans(hand_ws):
    from prefect import flow

    from flows.runtime import run_step

    settings = load_settings(None, ["plan.memory_gb=4"])
    params = {"settings": settings, "workspace": str(hand_ws.root)}
    path = plans_path(hand_ws)

    @flow
    def plan_thrice() -> list:
        first = run_step(tasks.plan, settings, hand_ws, "compute", **params)
        written = path.stat().st_mtime_ns
        cached = run_step(tasks.plan, settings, hand_ws, "compute", **params)
        untouched = path.stat().st_mtime_ns == written  # a cache hit writes nothing
        path.unlink()  # the cached result now points at a missing file
        again = run_step(
            tasks.plan, settings, hand_ws, "compute", stale=tasks.plans_stale, **params
        )
        return [first, cached, untouched, again]

    first, cached, untouched, again = plan_thrice()
    assert untouched and cached == first and "fingerprint" not in first
    assert again["plans"] == str(path) and path.exists()  # re-planned, not served from cache
    assert read_plans(hand_ws).memory_gb == 4.0 and again["pixdim"] == first["pixdim"]
