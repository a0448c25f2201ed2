"""How flows run their tasks: result storage, retries, timeouts, caching switch, task runner.

Everything here comes from ``settings.orchestration`` and is applied when a flow runs (the
workspace, and so where results are stored, is only known then).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from prefect import get_run_logger
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.tasks import Task, exponential_backoff

from medml.config import OrchestrationConfig, Settings
from medml.workspace import Workspace

Kind = Literal["io", "compute", "train"]


def results_dir(settings: Settings, ws: Workspace) -> Path:
    """Where step results (small JSON records keyed by cache key) persist: in the workspace."""
    return Path(settings.orchestration.results or ws.root / "prefect-results").resolve()


def configured(
    task: Task, settings: Settings, ws: Workspace, kind: Kind, timeout: bool = True
) -> Task:
    """``task`` with this project's result storage, retries (I/O only), timeout and cache.

    ``timeout=False`` for mapped tasks: they run in worker threads (of the thread pool or of a
    Dask worker), which a timeout cannot interrupt; Prefect would only warn at each one.
    """
    o = settings.orchestration
    options: dict[str, Any] = {
        "persist_result": True,
        "result_storage": results_dir(settings, ws),
        "result_serializer": "json",
        "cache_expiration": timedelta(days=o.cache_days) if o.cache_days else None,
    }
    limit = o.train_timeout_s if kind == "train" else o.io_timeout_s
    if timeout and limit:
        options["timeout_seconds"] = limit
    if kind == "io" and o.retries:
        options["retries"] = o.retries
        options["retry_delay_seconds"] = exponential_backoff(o.retry_backoff_s)(o.retries)
        options["retry_jitter_factor"] = 0.2
    if not o.cache:
        options["cache_policy"] = NO_CACHE
    return task.with_options(**options)


def run_step(
    task: Task,
    settings: Settings,
    ws: Workspace,
    kind: Kind,
    /,
    stale: Callable[[Any], str | None] | None = None,
    **params: Any,
) -> Any:
    """Run one step; if its cached result points at something gone, run it afresh.

    ``stale(result)`` names what is missing (a deleted run, volume or file) or returns None.
    A cache key cannot see outputs deleted after the step ran, so this check closes that gap.
    """
    step = configured(task, settings, ws, kind)
    state = step(**params, return_state=True)
    result = state.result()
    if state.name == "Cached" and stale is not None:
        problem = stale(result)
        if problem:
            get_run_logger().warning("cached %s is stale (%s): re-running", task.name, problem)
            result = step.with_options(refresh_cache=True)(**params)
    return result


def task_runner(o: OrchestrationConfig) -> TaskRunner:
    """The runner of map-heavy steps: threads here, or Dask (a local or a remote cluster)."""
    if o.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if o.dask_address:  # its workers need PREFECT_API_URL and the workspace themselves
            return DaskTaskRunner(address=o.dask_address)
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": o.dask_workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
            }
        )
    return ThreadPoolTaskRunner(max_workers=o.max_workers)


@contextmanager
def reachable_api(o: OrchestrationConfig) -> Iterator[None]:
    """Name the API by URL for Dask workers, which are other processes.

    A serverless run (``make demo``) and Prefect's test harness use an ephemeral server that
    the settings do not name; tasks shipped to Dask workers carry these settings, and each
    worker would start a server of its own. With ``PREFECT_API_URL`` set this does nothing.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if o.task_runner != "dask" or PREFECT_API_URL.value():
        yield
        return
    with get_client(sync_client=True) as client:
        url = str(client.api_url).rstrip("/")
    with temporary_settings({PREFECT_API_URL: url}):
        yield


def start(settings: Settings | None, workspace: str | None) -> tuple[Settings, Workspace]:
    """A flow's settings and workspace, ready: settings given, else ``$MEDML_CONFIG`` (how
    ``prefect.yaml`` deployments and the compose worker name theirs), else defaults."""
    from medml.config import load_settings
    from medml.tracking import configure

    settings = settings or load_settings(os.environ.get("MEDML_CONFIG") or None)
    chosen = workspace or os.environ.get("MEDML_WORKSPACE") or settings.workspace
    ws = Workspace.resolve(chosen).ensure()
    configure(ws)
    return settings, ws
