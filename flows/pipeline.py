"""The whole chain as one Prefect flow: synthesize -> ingest -> plan -> preprocess -> train ->
evaluate -> package -> register (prototypes) -> batch inference on the held-out scans.

Every step is cached on its inputs, config, code and data (``flows.caching``): a second run with
nothing changed skips them all; a changed config section re-runs only the steps that read it and
those downstream of a changed result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows import artifacts
from flows.batch_inference import predict_rows
from flows.ingest import ingest_step
from flows.prototypes import prototypes_step
from flows.runtime import run_step, start
from flows.tasks import (
    evaluate_encoder,
    package_model,
    plan,
    plans_stale,
    preprocess,
    run_stale,
    synthesize,
    train_encoder,
)
from medml.config import Settings
from medml.evaluate.run import heldout_inputs, prediction_accuracy


def _raw_stale(result: dict[str, Any]) -> str | None:
    return None if Path(result["labels"]).exists() else f"{result['labels']} is missing"


@flow(name="medml-pipeline", log_prints=True)
def pipeline(settings: Settings, workspace: str) -> dict[str, Any]:
    """Synthetic data to registered few-shot model and predictions, tracked in MLflow."""
    settings, ws = start(settings, workspace)
    common = {"settings": settings, "workspace": str(ws.root)}
    raw = run_step(synthesize, settings, ws, "io", stale=_raw_stale, **common)
    ingested = ingest_step(settings, ws, raw["raw"], raw["labels"])
    run_step(plan, settings, ws, "compute", stale=plans_stale, **common)
    cached = run_step(preprocess, settings, ws, "compute", **common)
    stale = run_stale(str(ws.root))
    trained = run_step(train_encoder, settings, ws, "train", stale=stale, **common)
    evaluated = run_step(evaluate_encoder, settings, ws, "compute", run=trained, **common)
    artifacts.evaluation(evaluated)
    packaged = run_step(package_model, settings, ws, "io", run=trained, **common)
    champion = prototypes_step(settings, ws, packaged["model_uri"], None)
    alias_uri = f"models:/{champion['name']}@{champion['alias']}"

    # Held-out (test split) scans, scored against their catalog labels.
    rows, truth = heldout_inputs(ws, "test")
    predicted = predict_rows(rows, alias_uri, settings, ws, ws.reports / "predictions.csv")
    predicted["accuracy_vs_labels"] = prediction_accuracy(predicted["predictions"], truth)
    artifacts.predictions(predicted, predicted["model_uri"])
    get_run_logger().info(
        "predicted %d scans (%d errors), accuracy vs labels %.3f",
        predicted["n"],
        predicted["errors"],
        predicted["accuracy_vs_labels"],
    )
    return {
        "workspace": str(ws.root),
        "ingest": ingested,
        "preprocess": cached,
        "train": {**trained, "metrics": evaluated["metrics"], "model_uri": packaged["model_uri"]},
        "champion": champion,
        "champion_uri": alias_uri,
        "predict": predicted,
    }
