"""The ``sweep`` flow: the loss comparison (Reality Check protocol) under one MLflow parent."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows import artifacts
from flows.runtime import run_step, start
from flows.tasks import preprocess, run_stale, sweep_losses
from medml.config import Settings


def with_budget(settings: Settings, **budget: int | None) -> Settings:
    """``settings`` with the given ``sweep`` fields (folds, trials, seeds, workers) replaced."""
    chosen = {k: v for k, v in budget.items() if v is not None}
    return settings.model_copy(update={"sweep": settings.sweep.model_copy(update=chosen)})


@flow(name="sweep", log_prints=True)
def sweep_flow(
    losses: list[str],
    settings: Settings | None = None,
    workspace: str | None = None,
    folds: int | None = None,
    trials: int | None = None,
    seeds: int | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Cross-validate, tune and refit each loss; the table and verdict are artifacts.

    Folds (and losses) of a trial round run as parallel ``sweep-fit`` tasks: on a local Dask
    cluster when ``workers`` > 1. A re-run resumes the Optuna studies where they stopped.
    """
    settings, ws = start(settings, workspace)
    settings = with_budget(settings, folds=folds, trials=trials, seeds=seeds, workers=workers)
    common = {"settings": settings, "workspace": str(ws.root)}
    run_step(preprocess, settings, ws, "compute", **common)
    result = run_step(
        sweep_losses,
        settings,
        ws,
        "train",
        stale=run_stale(str(ws.root), "parent_run_id"),
        losses=list(losses),
        **common,
    )
    artifacts.sweep(result)
    return result
