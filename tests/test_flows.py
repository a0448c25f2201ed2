"""Orchestration without a server: cache keys, step options, runners, prefect.yaml, stale checks."""

from __future__ import annotations

import importlib
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from prefect.cache_policies import NO_CACHE, CacheKeyFnPolicy
from prefect.client.schemas.schedules import CronSchedule
from prefect.flows import Flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows import caching, tasks
from flows.runtime import configured, task_runner
from medml.catalog import Catalog
from medml.config import OrchestrationConfig, load_settings
from medml.io import jsonable
from medml.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def key_parts(task, **params):
    """The data/config/code part of a task's cache key (the task-source part needs a run)."""
    policy = next(p for p in task.cache_policy.policies if isinstance(p, CacheKeyFnPolicy))
    return policy.cache_key_fn(None, params)


@pytest.fixture()
def ws_copy(tmp_path, ingested) -> Workspace:
    """A private copy of the ingested session workspace (its catalog is changed here)."""
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(ingested.root, ws.root)
    return ws


def test_tree_fingerprint_sees_new_and_touched_files(tmp_path):
    (tmp_path / "a").mkdir()
    f = tmp_path / "a" / "x.dcm"
    f.write_bytes(b"1")
    first = caching.tree_fingerprint(tmp_path)
    assert caching.tree_fingerprint(tmp_path) == first
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    touched = caching.tree_fingerprint(tmp_path)
    assert touched != first
    (tmp_path / "a" / "y.dcm").write_bytes(b"2")
    assert caching.tree_fingerprint(tmp_path) not in {first, touched}
    assert caching.tree_fingerprint(tmp_path / "nope") != caching.tree_fingerprint(tmp_path / "no")


def test_catalog_fingerprint_splits_only_when_asked(ws_copy):
    url = ws_copy.catalog_url
    without, with_ = (caching.catalog_fingerprint(url, s) for s in (False, True))
    catalog = Catalog(url)
    scans = catalog.list_scans(labelled=False)
    catalog.set_splits({scans[0]["scan_id"]: "val" if scans[0]["split"] != "val" else "test"})
    assert caching.catalog_fingerprint(url, False) == without  # preprocess assigns splits
    assert caching.catalog_fingerprint(url, True) != with_  # training reads them


def test_training_key_follows_training_config_and_data_only(ws_copy):
    base = load_settings(TINY)
    params = {"settings": base, "workspace": str(ws_copy.root)}
    key = key_parts(tasks.train_encoder, **params)
    for override in ("predict.batch_size=3", "prototypes.shots=1", "orchestration.retries=0"):
        other = {**params, "settings": load_settings(TINY, [override])}
        assert key_parts(tasks.train_encoder, **other) == key, override
    for override in ("train.epochs=3", "model.embedding_dim=8", "split.seed=5"):
        other = {**params, "settings": load_settings(TINY, [override])}
        assert key_parts(tasks.train_encoder, **other) != key, override
    catalog = Catalog(ws_copy.catalog_url)  # a relabelled scan is new data
    scan = catalog.list_scans(labelled=False)[0]
    catalog.upsert_scan({**scan, "label": "CT-relabelled"})
    assert key_parts(tasks.train_encoder, **params) != key


def test_prediction_key_follows_model_batch_config_and_files(ws_copy):
    volume = next(ws_copy.volumes.glob("*.nii.gz"))
    params = {
        "model_uri": "models:/m/1",
        "model_tag": "tag-1",
        "rows": [{"path": str(volume)}],
        "settings": load_settings(TINY),
        "workspace": str(ws_copy.root),
    }
    key = key_parts(tasks.predict_batch, **params)
    retrained = load_settings(TINY, ["train.epochs=9"])
    assert key_parts(tasks.predict_batch, **{**params, "settings": retrained}) == key
    assert key_parts(tasks.predict_batch, **{**params, "model_tag": "tag-2"}) != key
    os.utime(volume, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert key_parts(tasks.predict_batch, **params) != key


def test_ingest_key_follows_the_source_tree_and_labels(tmp_path, tiny_raw):
    src = tmp_path / "src"
    shutil.copytree(tiny_raw, src)
    params = {
        "source": str(src),
        "labels": str(src / "labels.csv"),
        "settings": load_settings(TINY),
        "workspace": str(tmp_path / "ws"),
    }
    key = key_parts(tasks.ingest_source, **params)
    assert key_parts(tasks.ingest_source, **params) == key
    (src / "new.nii.gz").write_bytes(b"not really")
    assert key_parts(tasks.ingest_source, **params) != key
    key = key_parts(tasks.ingest_source, **params)
    with (src / "labels.csv").open("a") as fh:
        fh.write("\n")
    assert key_parts(tasks.ingest_source, **params) != key


def test_ingest_stale_check_names_a_missing_volume(ws_copy):
    scan = Catalog(ws_copy.catalog_url).list_scans(labelled=False)[0]
    check = tasks.ingest_stale(str(ws_copy.root))
    assert check({"scan_ids": [scan["scan_id"]]}) is None
    (ws_copy.root / scan["volume"]).unlink()
    assert scan["volume"] in check({"scan_ids": [scan["scan_id"]]})
    assert "not in the catalog" in check({"scan_ids": ["0" * 16]})


def test_step_options_retries_timeouts_storage_and_cache_switch(tmp_path):
    settings = load_settings(TINY, ["orchestration.retries=3", "orchestration.retry_backoff_s=2"])
    ws = Workspace(tmp_path)
    io = configured(tasks.ingest_source, settings, ws, "io")
    assert io.retries == 3 and list(io.retry_delay_seconds) == [2, 4, 8]
    assert io.persist_result and Path(io.result_storage) == tmp_path / "prefect-results"
    assert io.timeout_seconds == settings.orchestration.io_timeout_s
    train = configured(tasks.train_encoder, settings, ws, "train")
    assert train.retries == 0 and train.timeout_seconds is None
    no_cache = load_settings(TINY, ["orchestration.cache=false"])
    off = configured(tasks.train_encoder, no_cache, ws, "train")
    assert off.cache_policy is NO_CACHE


def test_task_runner_switch():
    assert isinstance(task_runner(OrchestrationConfig()), ThreadPoolTaskRunner)
    from prefect_dask import DaskTaskRunner

    remote = task_runner(OrchestrationConfig(task_runner="dask", dask_address="tcp://h:8786"))
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://h:8786"
    local = task_runner(OrchestrationConfig(task_runner="dask", dask_workers=3))
    assert local.cluster_kwargs["n_workers"] == 3


def test_jsonable_results():
    out = jsonable({"a": np.float32(0.5), "b": np.int64(3), "c": float("nan"), "p": Path("/x")})
    assert out == {"a": 0.5, "b": 3, "c": None, "p": "/x"}


def test_prefect_yaml_names_real_flows_on_a_process_pool():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert spec["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    names = set()
    for dep in spec["deployments"]:
        path, func = dep["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, func)
        assert isinstance(flow, Flow), dep["entrypoint"]
        assert set(dep.get("parameters", {})) <= set(flow.parameters.properties), dep["name"]
        assert dep["work_pool"]["name"] == "medml-process"
        for schedule in dep.get("schedules", []):
            CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
        names.add(f"{flow.name}/{dep['name']}")
    assert {"batch-inference/nightly", "ingest/scheduled", "train/manual"} <= names
    assert {"sweep/manual", "prototypes/manual"} <= names


def test_served_deployments_follow_the_config(tmp_path):
    from flows.serve import build_deployments

    settings = load_settings(
        TINY, ["orchestration.predict_cron=30 3 * * 1", "orchestration.timezone=Europe/Paris"]
    )
    deps = {f"{d.flow_name}/{d.name}": d for d in build_deployments(settings, Workspace(tmp_path))}
    assert set(deps) == {
        "batch-inference/nightly",
        "ingest/scheduled",
        "train/manual",
        "sweep/manual",
        "prototypes/manual",
        "medml-pipeline/manual",
    }
    nightly = deps["batch-inference/nightly"]
    assert nightly.schedules[0].schedule.cron == "30 3 * * 1"
    assert nightly.schedules[0].schedule.timezone == "Europe/Paris"
    assert nightly.parameters["inputs"] == [str(tmp_path / "inbox")]
    assert nightly.entrypoint == "flows.batch_inference.batch_inference_flow"
    assert not deps["train/manual"].schedules
    assert (tmp_path / "inbox").is_dir() and (tmp_path / "incoming").is_dir()
