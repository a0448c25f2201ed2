"""``medml serve``: this project's deployments, served from one process.

- ``batch-inference/nightly`` on ``orchestration.predict_cron`` (02:00): the watch folder;
- ``ingest/scheduled`` on ``orchestration.ingest_cron`` (01:00): the incoming folder;
- ``pacs/scheduled`` on ``pacs.cron`` (when set): new PACS studies -> predictions -> DICOM SR;
- ``train/manual``, ``sweep/manual``, ``prototypes/manual``, ``medml-pipeline/manual``: on
  demand, with parameters.

Schedules live in a Prefect server (the ephemeral in-process API has no scheduler), so serving
needs ``PREFECT_API_URL``; :func:`local_server` starts one on 127.0.0.1 for ``--start-server``.
For ``prefect deploy`` to a process work pool, see ``prefect.yaml`` at the repository root.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron

from flows.batch_inference import batch_inference_flow
from flows.ingest import ingest_flow
from flows.pacs import pacs_flow
from flows.pipeline import pipeline
from flows.prototypes import prototypes_flow
from flows.sweep import sweep_flow
from flows.train import train_flow
from medml.config import Settings
from medml.workspace import Workspace

log = logging.getLogger(__name__)

NO_SERVER_HELP = """\
medml serve needs a Prefect server: schedules and manual runs are kept there.
Start one in another terminal and point medml at it:

    prefect server start --host 127.0.0.1 --port 4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    medml serve --config CFG

or let medml start one on 127.0.0.1 for as long as it serves:

    medml serve --config CFG --start-server

(A team server: see docs/operations.md.)"""


def api_url() -> str | None:
    """The configured Prefect API (environment or profile), or None for ephemeral mode."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def healthy(url: str, timeout: float = 2.0) -> bool:
    """Whether a Prefect API answers its health check at ``url`` (``http://host:port/api``)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


@contextmanager
def local_server(port: int, ws: Workspace, timeout_s: float) -> Iterator[str]:
    """Run ``prefect server start`` on 127.0.0.1:``port`` while the block runs; yield its API URL.

    A server already answering on that port is used as it is (and left running). The one started
    here runs in its own process group, logs to ``WS/prefect-server.log``, and is stopped by PID.
    """
    url = f"http://127.0.0.1:{port}/api"
    if healthy(url):
        log.info("a Prefect server already answers at %s; using it", url)
        yield url
        return
    logfile = ws.root / "prefect-server.log"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    cmd += ["--port", str(port)]
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    with logfile.open("ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    log.info("starting Prefect server (pid %d) at %s; log %s", proc.pid, url, logfile)
    try:
        deadline = time.monotonic() + timeout_s
        while not healthy(url):
            if proc.poll() is not None:
                tail = logfile.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prefect server did not answer at {url} in {timeout_s:.0f}s")
            time.sleep(1.0)
        log.info("Prefect server ready: UI at %s", url.removesuffix("/api"))
        yield url
    finally:
        stop_process_group(proc)


def stop_process_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the process group led by ``proc`` (started with a new session), then SIGKILL."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _cron(expr: str | None, timezone: str) -> list[Any]:
    return [Cron(expr, timezone=timezone)] if expr else []


def build_deployments(settings: Settings, ws: Workspace) -> list[RunnerDeployment]:
    """The served deployments; parameters default to this config and workspace."""
    o = settings.orchestration
    watch = Path(o.watch_dir or ws.root / "inbox").resolve()
    incoming = Path(o.ingest_source or ws.root / "incoming").resolve()
    for folder in (watch, incoming):
        folder.mkdir(parents=True, exist_ok=True)
    base = {"settings": settings.model_dump(mode="json"), "workspace": str(ws.root)}
    labels = str(Path(o.ingest_labels).resolve()) if o.ingest_labels else None
    model = f"models:/{settings.prototypes.model_name}@{settings.prototypes.alias}"
    common = {"entrypoint_type": EntrypointType.MODULE_PATH, "tags": ["medml"]}
    deployments = [
        batch_inference_flow.to_deployment(
            "nightly",
            schedules=_cron(o.predict_cron, o.timezone),
            parameters={**base, "inputs": [str(watch)], "model_uri": model},
            description=f"Predict every scan under {watch} with {model}.",
            **common,
        ),
        ingest_flow.to_deployment(
            "scheduled",
            schedules=_cron(o.ingest_cron, o.timezone),
            parameters={**base, "source": str(incoming), "labels": labels},
            description=f"Ingest {incoming} into the workspace catalog.",
            **common,
        ),
        train_flow.to_deployment("manual", parameters=base, **common),
        sweep_flow.to_deployment(
            "manual", parameters={**base, "losses": [settings.loss.name, "softmax"]}, **common
        ),
        prototypes_flow.to_deployment(
            "manual", parameters=base, description="Needs model_uri (runs:/ID/model).", **common
        ),
        pipeline.to_deployment("manual", parameters=base, **common),
    ]
    if settings.pacs.cron:
        deployments.append(
            pacs_flow.to_deployment(
                "scheduled",
                schedules=_cron(settings.pacs.cron, o.timezone),
                parameters=base,
                description=f"New studies on PACS {settings.pacs.name} -> predictions -> DICOM SR.",
                **common,
            )
        )
    return deployments


def serve_deployments(settings: Settings, ws: Workspace, url: str | None = None) -> None:
    """Register the deployments with the server and run their flow runs until interrupted."""
    from prefect import serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if url is None:
        serve(*build_deployments(settings, ws))
        return
    os.environ["PREFECT_API_URL"] = url  # flow runs are subprocesses: they read the environment
    with temporary_settings({PREFECT_API_URL: url}):
        serve(*build_deployments(settings, ws))
