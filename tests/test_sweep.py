"""A sweep against a real `mlflow server`, checked through its REST API as the UI will read it."""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import requests

from medml.config import Settings
from medml.sweep import TABLE_METRICS, summarise, to_markdown
from medml.workspace import Workspace

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def mlflow_server(tmp_path):
    port = _free_port()
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination",
        str(tmp_path / "artifacts"),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("mlflow server did not start within 180 s")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def test_sweep_parent_children_and_metrics_via_rest(
    tmp_path, ingested, tiny_settings: Settings, mlflow_server, monkeypatch
):
    from medml.sweep import sweep

    ws = Workspace(tmp_path / "ws")
    shutil.copytree(ingested.root, ws.root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    settings = tiny_settings.model_copy(
        update={
            "train": tiny_settings.train.model_copy(
                update={"epochs": 1, "experiment": "sweep-test"}
            )
        }
    )
    result = sweep(settings, ws, ["triplet", "adacos"], seeds=1)
    assert len(result.rows) == 2 and result.table_csv.exists()

    api = f"{mlflow_server}/api/2.0/mlflow"
    exp = requests.get(
        f"{api}/experiments/get-by-name", params={"experiment_name": "sweep-test"}, timeout=10
    ).json()["experiment"]
    children = requests.post(
        f"{api}/runs/search",
        timeout=10,
        json={
            "experiment_ids": [exp["experiment_id"]],
            "filter": f"tags.mlflow.parentRunId = '{result.parent_run_id}'",
        },
    ).json()["runs"]
    assert len(children) == 2
    for run in children:
        metrics = {m["key"] for m in run["data"]["metrics"]}
        assert {"train_loss", "val_mean_average_precision_at_r", "test_accuracy"} <= metrics
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["medml.loss"] in {"triplet", "adacos"}
    parent = requests.get(
        f"{api}/runs/get", params={"run_id": result.parent_run_id}, timeout=10
    ).json()["run"]
    parent_metrics = {m["key"] for m in parent["data"]["metrics"]}
    # Every defined (non-NaN) table cell is a parent metric; a tiny test split can leave the
    # retrieval metrics undefined (all classes singletons), and NaN cells are not logged.
    expected = {
        f"{r['loss']}.{m}"
        for r in result.rows
        for m in TABLE_METRICS
        if r.get(m) is not None and math.isfinite(r[m])
    }
    assert {"triplet.accuracy", "adacos.accuracy"} <= expected <= parent_metrics
    files = requests.get(
        f"{api}/artifacts/list",
        timeout=10,
        params={"run_id": result.parent_run_id, "path": "comparison"},
    ).json()
    names = {f["path"] for f in files["files"]}
    assert {"comparison/runs.csv"} <= names and any(n.endswith(".md") for n in names)


def test_summary_table_mean_and_ci():
    rows = [{"loss": "a", "seed": s, "accuracy": v} for s, v in enumerate([0.5, 0.7])]
    rows.append({"loss": "b", "seed": 0, "accuracy": 0.9})
    table = summarise(rows)
    a = table[table.loss == "a"].iloc[0]
    assert a["accuracy"] == pytest.approx(0.6)
    assert a["accuracy_ci95"] == pytest.approx(1.96 * 0.1414213 / 2**0.5, rel=1e-4)
    md = to_markdown(table)
    assert "| a | 2 | 0.600 ± 0.196 |" in md and "| b | 1 | 0.900 |" in md
