"""The ``train`` flow: patient splits + MONAI cache, then one tracked training run."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows import artifacts
from flows.runtime import run_step, start
from flows.tasks import evaluate_encoder, package_model, preprocess, run_stale, train_encoder
from medml.config import Settings


@flow(name="train", log_prints=True)
def train_flow(settings: Settings | None = None, workspace: str | None = None) -> dict[str, Any]:
    """Train, evaluate and package an encoder; the evaluation table is an artifact."""
    settings, ws = start(settings, workspace)
    common = {"settings": settings, "workspace": str(ws.root)}
    run_step(preprocess, settings, ws, "compute", **common)
    stale = run_stale(str(ws.root))
    trained = run_step(train_encoder, settings, ws, "train", stale=stale, **common)
    evaluated = run_step(evaluate_encoder, settings, ws, "compute", run=trained, **common)
    artifacts.evaluation(evaluated)
    packaged = run_step(package_model, settings, ws, "io", run=trained, **common)
    return {**trained, "metrics": evaluated["metrics"], "model_uri": packaged["model_uri"]}
