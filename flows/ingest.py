"""The ``ingest`` flow: a folder tree into the workspace catalog, with its report as artifact.

Scheduled by ``medml serve`` over ``orchestration.ingest_source`` (``WS/incoming``). Ingest is
one cached step: the report accounts for a whole source tree and labels match paths relative to
it. With ``orchestration.task_runner: dask`` its series conversions run as ``convert-scan`` tasks
on the Dask cluster (see docs/operations.md, "A cluster").
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows import artifacts
from flows.runtime import run_step, start
from flows.tasks import ingest_source, ingest_stale
from medml.config import Settings
from medml.workspace import Workspace


@flow(name="ingest", log_prints=True)
def ingest_flow(
    source: str,
    labels: str | None = None,
    settings: Settings | None = None,
    workspace: str | None = None,
) -> dict[str, Any]:
    """Ingest ``source`` (DICOM/NIfTI tree) into the workspace; skipped when nothing changed."""
    settings, ws = start(settings, workspace)
    result = ingest_step(settings, ws, source, labels)
    # the source path stays out of Prefect's logs (it may name patients); the report has it
    get_run_logger().info("ingest: %d scans, report %s", result["scans"], result["report"])
    return result


def ingest_step(
    settings: Settings, ws: Workspace, source: str, labels: str | None
) -> dict[str, Any]:
    """The cached ``ingest`` step with its report as artifact (this flow's and the pipeline's)."""
    result = run_step(
        ingest_source,
        settings,
        ws,
        "io",
        stale=ingest_stale(str(ws.root)),
        source=source,
        labels=labels,
        settings=settings,
        workspace=str(ws.root),
    )
    artifacts.ingest_report(result)
    return result
