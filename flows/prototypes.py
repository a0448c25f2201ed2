"""The ``prototypes`` flow: a support set -> class prototypes -> a new registered version."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.runtime import run_step, start
from flows.tasks import build_prototypes, version_stale
from medml.config import Settings
from medml.workspace import Workspace


@flow(name="prototypes", log_prints=True)
def prototypes_flow(
    model_uri: str,
    support: str | None = None,
    settings: Settings | None = None,
    workspace: str | None = None,
) -> dict[str, Any]:
    """Register ``model_uri``'s encoder with prototypes from ``support`` (CSV or class folders;
    default: ``prototypes.shots`` scans per class of the train split) under
    ``prototypes.model_name`` and move ``prototypes.alias`` to it."""
    settings, ws = start(settings, workspace)
    return prototypes_step(settings, ws, model_uri, support)


def prototypes_step(
    settings: Settings, ws: Workspace, model_uri: str, support: str | None
) -> dict[str, Any]:
    """The cached ``prototypes`` step (this flow's and the pipeline's)."""
    return run_step(
        build_prototypes,
        settings,
        ws,
        "io",
        stale=version_stale(str(ws.root)),
        model_uri=model_uri,
        support=support,
        settings=settings,
        workspace=str(ws.root),
    )
