"""`medml serve --start-server` for real: a Prefect server on 127.0.0.1 (its own PREFECT_HOME),
the deployments served from one process, a run triggered through the API, a one-minute schedule,
and everything stopped by PID at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.serve import healthy, stop_process_group
from medml.catalog import Catalog
from medml.cli import app
from medml.workspace import Workspace

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_without_a_server_explains_how_to_start_one(monkeypatch, tmp_path):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: None}):
        result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 1
    assert "prefect server start" in result.output and "--start-server" in result.output
    assert not (tmp_path / "workspace").exists()  # a refused start leaves nothing behind


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"medml serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(2)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


def test_served_deployments_run_on_demand_and_on_schedule(tmp_path, tiny_raw):
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    ws = Workspace(tmp_path / "ws")
    incoming = tmp_path / "incoming"
    shutil.copytree(tiny_raw / "nifti", incoming / "nifti")  # a small, real source tree
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    cmd = [
        sys.executable, "-m", "medml.cli", "serve", "--start-server",
        "--config", str(ROOT / "configs" / "tiny.yaml"), "--workspace", str(ws.root),
        "--set", f"orchestration.server_port={port}",
        "--set", "orchestration.predict_cron='* * * * *'",  # every minute
        "--set", "orchestration.ingest_cron=null",
        "--set", f"orchestration.ingest_source={incoming}",
    ]  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
            start_new_session=True,
        )  # fmt: skip
    try:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        _wait(lambda: healthy(url), 240, "the Prefect server", proc, log)
        with (
            temporary_settings(updates={PREFECT_API_URL: url}),
            get_client(sync_client=True) as client,
        ):

            def deployments():
                found = client.read_deployments()
                return {f"{d.name}": d for d in found} if len(found) >= 6 else None

            deps = _wait(deployments, 120, "six deployments", proc, log)
            nightly = deps["nightly"]
            assert [s.schedule.cron for s in nightly.schedules] == ["* * * * *"]
            assert not deps["scheduled"].schedules  # ingest_cron=null: manual only

            # A manual run through the API, with a parameter, waited for to the end.
            run = run_deployment(
                "ingest/scheduled", parameters={"source": str(incoming)}, timeout=240
            )
            assert run.state.is_completed(), run.state.message
            scans = Catalog(ws.catalog_url).list_scans(labelled=False)
            assert scans and all((ws.root / s["volume"]).exists() for s in scans)

            # The one-minute schedule: the scheduler creates runs, the served process
            # runs them (an empty watch folder: nothing to predict, a quick success).
            dep_filter = DeploymentFilter(name=DeploymentFilterName(any_=["nightly"]))

            def scheduled_completed():
                runs = client.read_flow_runs(deployment_filter=dep_filter)
                return [r for r in runs if r.auto_scheduled and r.state.is_completed()]

            done = _wait(scheduled_completed, 150, "a scheduled run", proc, log)
            assert done[0].deployment_id == nightly.id
    finally:
        proc.send_signal(signal.SIGINT)  # graceful: serve stops, then stops its server
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        stop_process_group(proc)
    assert proc.poll() is not None
    deadline = time.monotonic() + 30
    while healthy(url) and time.monotonic() < deadline:
        time.sleep(1)
    assert not healthy(url), "the Prefect server outlived medml serve"
