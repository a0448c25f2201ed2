"""The ``sweep`` flow: several losses trained on the same data, seeds and budget."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows import artifacts
from flows.runtime import run_step, start
from flows.tasks import preprocess, run_stale, sweep_losses
from medml.config import Settings


@flow(name="sweep", log_prints=True)
def sweep_flow(
    losses: list[str],
    seeds: int = 1,
    settings: Settings | None = None,
    workspace: str | None = None,
) -> dict[str, Any]:
    """Train each loss under one parent MLflow run; the comparison table is an artifact."""
    settings, ws = start(settings, workspace)
    common = {"settings": settings, "workspace": str(ws.root)}
    run_step(preprocess, settings, ws, "compute", **common)
    result = run_step(
        sweep_losses,
        settings,
        ws,
        "train",
        stale=run_stale(str(ws.root), "parent_run_id"),
        losses=list(losses),
        seeds=seeds,
        **common,
    )
    artifacts.sweep(result)
    return result
