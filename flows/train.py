"""The ``train`` flow: patient splits + MONAI cache, then one tracked training run."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows import artifacts
from flows.runtime import run_step, start
from flows.tasks import preprocess, run_stale, train_encoder
from medml.config import Settings


@flow(name="train", log_prints=True)
def train_flow(settings: Settings | None = None, workspace: str | None = None) -> dict[str, Any]:
    """Train an encoder on the catalog's train split; the evaluation table is an artifact."""
    settings, ws = start(settings, workspace)
    common = {"settings": settings, "workspace": str(ws.root)}
    run_step(preprocess, settings, ws, "compute", **common)
    stale = run_stale(str(ws.root))
    trained = run_step(train_encoder, settings, ws, "train", stale=stale, **common)
    artifacts.evaluation(trained)
    return trained
