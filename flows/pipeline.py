"""The whole chain as one Prefect flow: synth -> ingest -> preprocess -> train -> evaluate ->
prototypes -> batch inference. Each task calls one library function.
"""

from __future__ import annotations

import csv
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from medml.catalog import Catalog
from medml.config import Settings
from medml.data.dataset import cached_dataset, items_from_scans
from medml.fewshot.prototypes import select_support
from medml.fewshot.register import read_support, register_prototypes
from medml.ingest import ingest
from medml.io import atomic_path
from medml.predict.batch import predict_frame
from medml.synth import generate
from medml.tracking import configure
from medml.train import ensure_splits, train
from medml.workspace import Workspace

# Settings objects are passed between tasks; caching across runs is the orchestration issue's.
TASK = {"cache_policy": NO_CACHE, "persist_result": False}


@task(name="synthesize", **TASK)
def synthesize(settings: Settings, ws: Workspace) -> dict[str, Any]:
    result = generate(settings.synth, ws.raw, progress=False)
    get_run_logger().info("wrote %d studies of %d patients", result.n_studies, result.n_patients)
    return {"raw": str(result.out), "labels": str(result.labels_csv), "studies": result.n_studies}


@task(name="ingest", retries=1, retry_delay_seconds=2, **TASK)
def ingest_raw(src: str, labels: str, settings: Settings, ws: Workspace) -> dict[str, Any]:
    result = ingest(src, ws, labels, settings.ingest, progress=False)
    get_run_logger().info("ingest counts %s, report %s", result.counts, result.report_path)
    return {"report": str(result.report_path), **result.counts}


@task(name="preprocess", **TASK)
def preprocess(settings: Settings, ws: Workspace) -> dict[str, Any]:
    """Split patients, then fill the persistent cache so training epochs read no raw file."""
    scans = ensure_splits(Catalog(ws.catalog_url), settings.split)
    dataset = cached_dataset(ws, settings.preprocess, items_from_scans(ws, scans, []))
    for i in range(len(dataset)):
        dataset[i]
    splits = pd.Series([s["split"] for s in scans]).value_counts().to_dict()
    get_run_logger().info("cached %d volumes; splits %s", len(dataset), splits)
    return {"cached": len(dataset), "splits": splits}


@task(name="train", **TASK)
def train_encoder(settings: Settings, ws: Workspace) -> dict[str, Any]:
    result = train(settings, ws, progress=False)
    get_run_logger().info("run %s: test %s", result.run_id, result.metrics)
    return {"run_id": result.run_id, "model_uri": result.model_uri, "metrics": result.metrics}


@task(name="prototypes", **TASK)
def build_champion(model_uri: str, settings: Settings, ws: Workspace) -> dict[str, Any]:
    """K-shot support set from the training split -> prototypes -> registered model + alias."""
    pc = settings.prototypes
    scans = Catalog(ws.catalog_url).list_scans(split="train")
    picks = select_support([s["label"] for s in scans], pc.shots, np.random.default_rng(pc.seed))
    support_csv = ws.reports / "support.csv"
    with atomic_path(support_csv, suffix=".csv") as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "scan_id"])
        for i in picks:
            writer.writerow(
                [str(ws.root / scans[i]["volume"]), scans[i]["label"], scans[i]["scan_id"]]
            )
    reg = register_prototypes(model_uri, read_support(support_csv), pc.model_name, pc.alias)
    get_run_logger().info("registered %s version %s as @%s", reg.name, reg.version, reg.alias)
    return {**asdict(reg), "support_csv": str(support_csv)}


@task(name="batch-inference", **TASK)
def batch_inference(model_uri: str, settings: Settings, ws: Workspace) -> dict[str, Any]:
    """Predict the held-out (test split) scans with the registered model."""
    scans = Catalog(ws.catalog_url).list_scans(split="test")
    frame = pd.DataFrame(
        {
            "path": [str(ws.root / s["volume"]) for s in scans],
            "scan_id": [s["scan_id"] for s in scans],
        }
    )
    summary = predict_frame(
        model_uri,
        frame,
        ws.reports / "predictions.csv",
        settings.predict.batch_size,
        progress=False,
    )
    preds = pd.read_csv(summary.out)
    truth = {s["scan_id"]: s["label"] for s in scans}
    accuracy = float(np.mean([truth[i] == p for i, p in zip(preds.scan_id, preds.predicted_class)]))
    get_run_logger().info(
        "predicted %d scans (%d errors) in %.1fs",
        summary.n_inputs,
        summary.n_errors,
        summary.seconds,
    )
    return {
        "predictions": str(summary.out),
        "n": summary.n_inputs,
        "errors": summary.n_errors,
        "accuracy_vs_labels": accuracy,
        "seconds": summary.seconds,
    }


@flow(name="medml-pipeline", log_prints=True)
def pipeline(settings: Settings, workspace: str) -> dict[str, Any]:
    """Synthetic data to registered few-shot model and predictions, tracked in MLflow."""
    ws = Workspace(Path(workspace)).ensure()
    configure(ws)
    raw = synthesize(settings, ws)
    ingested = ingest_raw(raw["raw"], raw["labels"], settings, ws)
    cached = preprocess(settings, ws)
    trained = train_encoder(settings, ws)
    champion = build_champion(trained["model_uri"], settings, ws)
    alias_uri = f"models:/{champion['name']}@{champion['alias']}"
    predicted = batch_inference(alias_uri, settings, ws)
    return {
        "workspace": str(ws.root),
        "ingest": ingested,
        "preprocess": cached,
        "train": trained,
        "champion": champion,
        "champion_uri": alias_uri,
        "predict": predicted,
    }
