"""The whole chain as one Prefect flow: synth -> ingest -> preprocess -> train (+ evaluation) ->
prototypes -> batch inference on the held-out scans.

Every step is cached on its inputs, config, code and data (``flows.caching``): a second run with
nothing changed skips them all; a changed config section re-runs only the steps that read it and
those downstream of a changed result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger

from flows import artifacts
from flows.batch_inference import predict_rows
from flows.ingest import ingest_step
from flows.prototypes import prototypes_step
from flows.runtime import run_step, start
from flows.tasks import preprocess, run_stale, synthesize, train_encoder
from medml.catalog import Catalog
from medml.config import Settings


def _raw_stale(result: dict[str, Any]) -> str | None:
    return None if Path(result["labels"]).exists() else f"{result['labels']} is missing"


@flow(name="medml-pipeline", log_prints=True)
def pipeline(settings: Settings, workspace: str) -> dict[str, Any]:
    """Synthetic data to registered few-shot model and predictions, tracked in MLflow."""
    settings, ws = start(settings, workspace)
    common = {"settings": settings, "workspace": str(ws.root)}
    raw = run_step(synthesize, settings, ws, "io", stale=_raw_stale, **common)
    ingested = ingest_step(settings, ws, raw["raw"], raw["labels"])
    cached = run_step(preprocess, settings, ws, "compute", **common)
    stale = run_stale(str(ws.root))
    trained = run_step(train_encoder, settings, ws, "train", stale=stale, **common)
    artifacts.evaluation(trained)
    champion = prototypes_step(settings, ws, trained["model_uri"], None)
    alias_uri = f"models:/{champion['name']}@{champion['alias']}"

    # Held-out (test split) scans, scored against their catalog labels.
    scans = Catalog(ws.catalog_url).list_scans(split="test")
    rows = [{"path": str(ws.root / s["volume"]), "scan_id": s["scan_id"]} for s in scans]
    predicted = predict_rows(rows, alias_uri, settings, ws, ws.reports / "predictions.csv")
    preds = pd.read_csv(predicted["predictions"])
    truth = {s["scan_id"]: s["label"] for s in scans}
    hits = [truth[i] == p for i, p in zip(preds.scan_id, preds.predicted_class)]
    predicted["accuracy_vs_labels"] = float(np.mean(hits)) if hits else float("nan")
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
        "train": trained,
        "champion": champion,
        "champion_uri": alias_uri,
        "predict": predicted,
    }
