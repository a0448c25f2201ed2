"""The Prefect tasks: each calls one library function and returns a small JSON-able dict.

Results are JSON so that they persist in the workspace and a re-run can reuse them; each task's
cache key (``flows.caching``) names the config sections, data and code it depends on. Retries,
timeouts and result storage are applied per run by ``flows.runtime.configured``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.caching import (
    catalog_fingerprint,
    digest,
    file_digest,
    paths_fingerprint,
    step_cache,
    tree_fingerprint,
)
from flows.runtime import reachable_api, task_runner
from medml.catalog import Catalog
from medml.config import OrchestrationConfig, Settings
from medml.ingest import Converter, WorkerContext, failed
from medml.ingest import Task as IngestTask
from medml.io import jsonable
from medml.workspace import Workspace

# Settings sections that do not change what training produces: a new value re-runs only the
# steps that read them.
NOT_TRAINING = {
    "workspace",
    "synth",
    "ingest",
    "plan",
    "prototypes",
    "predict",
    "orchestration",
    "pacs",
    "sweep",
}


def _ws(workspace: str) -> Workspace:
    return Workspace(Path(workspace)).ensure()


def _resolved(p: dict[str, Any]) -> Settings:
    """The task's settings with the workspace's plans filled in, as its library call sees them."""
    from medml.planning import resolve

    return resolve(p["settings"], Workspace(Path(p["workspace"])))


def _training_key(p: dict[str, Any]) -> list[Any]:
    ws = Workspace(Path(p["workspace"]))
    return [
        _resolved(p).model_dump(mode="json", exclude=NOT_TRAINING),
        catalog_fingerprint(ws.catalog_url, with_splits=True),
        ws.mlflow_uri,
        str(ws.root),
    ]


# --------------------------------------------------------------------------- synth, ingest


@task(
    name="synthesize",
    cache_policy=step_cache(
        lambda p: [p["settings"].synth, str(Workspace(Path(p["workspace"])).raw)],
        "medml.synth",
    ),
)
def synthesize(settings: Settings, workspace: str) -> dict[str, Any]:
    """Write the synthetic export into ``WS/raw`` (medml.synth.generate)."""
    from medml.synth import generate

    result = generate(settings.synth, _ws(workspace).raw, progress=False)
    get_run_logger().info("wrote %d studies of %d patients", result.n_studies, result.n_patients)
    return {"raw": str(result.out), "labels": str(result.labels_csv), "studies": result.n_studies}


@task(
    name="ingest",
    cache_policy=step_cache(
        lambda p: [
            p["settings"].ingest,
            tree_fingerprint(p["source"]),
            file_digest(p["labels"]),
            str(Path(p["workspace"]).resolve()),
            Workspace(Path(p["workspace"])).catalog_url,
        ],
        "medml.ingest",
        "flows.runtime",  # mapped_converter's task runner
    ),
)
def ingest_source(
    source: str, labels: str | None, settings: Settings, workspace: str
) -> dict[str, Any]:
    """Ingest a folder tree into the workspace's catalog (medml.ingest.ingest).

    With the Dask runner each series is converted by a ``convert-scan`` task on the cluster;
    indexing, the catalog and the report stay here, so the report covers the whole tree.
    """
    from medml.ingest import ingest

    o = settings.orchestration
    converter = mapped_converter(o) if o.task_runner == "dask" else None
    result = ingest(
        source, _ws(workspace), labels, settings.ingest, progress=False, converter=converter
    )
    get_run_logger().info("ingest counts %s, report %s", result.counts, result.report_path)
    return jsonable(
        {"report": str(result.report_path), **result.counts, "scan_ids": result.scan_ids}
    )


@task(name="convert-scan", persist_result=False, cache_policy=NO_CACHE)
def convert_scan(ctx: Any, job: Any) -> Any:
    """One DICOM series or NIfTI file to its canonical volume (medml.ingest.convert).

    Not cached and not persisted: its input holds DICOM headers, which never leave the
    workers; the ingest step around it is what is cached.
    """
    from medml.ingest import convert

    return convert(ctx, job)


def mapped_converter(o: OrchestrationConfig) -> Converter:
    """Convert each series as a ``convert-scan`` task on ``o``'s task runner (Dask).

    The workers must see the source and the workspace at the same paths (a shared file system).
    """

    def run(ctx: WorkerContext, jobs: list[IngestTask]) -> Iterator[tuple[IngestTask, Any]]:
        with reachable_api(o), task_runner(o) as runner:
            futures = [runner.submit(convert_scan, {"ctx": ctx, "job": job}) for job in jobs]
            for job, future in zip(jobs, futures):
                try:
                    yield job, future.result()
                except Exception as exc:  # a worker died or the cluster went away
                    yield job, failed(ctx, job, f"conversion failed: {type(exc).__name__}")

    return run


def ingest_stale(workspace: str) -> Any:
    """Checks a cached ingest result: its scans are still in the catalog, with their volumes."""

    def check(result: dict[str, Any]) -> str | None:
        ws = Workspace(Path(workspace))
        catalog = Catalog(ws.catalog_url)
        for scan_id in result.get("scan_ids", []):
            row = catalog.get_scan(scan_id)
            if row is None:
                return f"scan {scan_id} is not in the catalog"
            if not (ws.root / row["volume"]).exists():
                return f"volume {row['volume']} is missing"
        return None

    return check


# ----------------------------------------------------------------- plan, preprocess, training


@task(
    name="plan",
    cache_policy=step_cache(
        lambda p: [
            p["settings"].plan,
            # not the splits: no plan depends on them (their class counts are as planned)
            catalog_fingerprint(Workspace(Path(p["workspace"])).catalog_url, with_splits=False),
            str(Path(p["workspace"]).resolve()),
        ],
        "medml.planning",
    ),
)
def plan(settings: Settings, workspace: str) -> dict[str, Any]:
    """Fingerprint the catalog and write ``WS/plans.json`` (medml.planning.plan_workspace)."""
    from medml.planning import plan_workspace

    plans, path = plan_workspace(Workspace(Path(workspace)), settings.plan)
    get_run_logger().info(
        "plans: %s pixdim %s, size %s, batch %d",
        plans.modality,
        plans.pixdim,
        plans.spatial_size,
        plans.batch_size,
    )
    return jsonable({"plans": str(path), **plans.model_dump(mode="json", exclude={"fingerprint"})})


def plans_stale(result: dict[str, Any]) -> str | None:
    """Checks a cached plan result: its plans file is still there."""
    return None if Path(result["plans"]).exists() else f"{result['plans']} is missing"


@task(
    name="preprocess",
    cache_policy=step_cache(
        lambda p: [
            _resolved(p).preprocess,
            p["settings"].split,
            catalog_fingerprint(Workspace(Path(p["workspace"])).catalog_url, with_splits=False),
            str(Path(p["workspace"]).resolve()),
        ],
        "medml.data.dataset",
        "medml.planning",  # resolve
    ),
)
def preprocess(settings: Settings, workspace: str) -> dict[str, Any]:
    """Split patients, then fill the persistent MONAI cache (medml.data.dataset), with the
    workspace's plans filling the preprocessing settings the config leaves unset."""
    from medml.data.dataset import preprocess_catalog
    from medml.planning import resolve

    ws = _ws(workspace)
    settings = resolve(settings, ws)
    result = preprocess_catalog(ws, settings.split, settings.preprocess)
    get_run_logger().info("cached %d volumes; splits %s", result["cached"], result["splits"])
    return jsonable(result)


@task(name="train", cache_policy=step_cache(_training_key, "medml.train"))
def train_encoder(settings: Settings, workspace: str) -> dict[str, Any]:
    """Fit an encoder, tracked in MLflow; the best epoch's checkpoint (medml.train.train)."""
    from medml.train import train

    result = train(settings, _ws(workspace), progress=False)
    get_run_logger().info(
        "run %s: best epoch %d, val MAP@R %.3f", result.run_id, result.best_epoch, result.best_score
    )
    return jsonable(
        {
            "run_id": result.run_id,
            "checkpoint": str(result.checkpoint),
            "best_epoch": result.best_epoch,
            "best_score": result.best_score,
            "classes": result.classes,
        }
    )


@task(name="pretrain", cache_policy=step_cache(_training_key, "medml.train.pretrain"))
def pretrain_encoder(settings: Settings, workspace: str) -> dict[str, Any]:
    """Contrastive pretraining on unlabelled scans (medml.train.pretrain.pretrain); its
    result's ``init_from`` goes into ``model.init_from`` of the training that follows."""
    from medml.train.pretrain import pretrain

    result = pretrain(settings, _ws(workspace), progress=False)
    get_run_logger().info("pretrained %s: NT-Xent %s", result.run_id, result.losses[-1:])
    return {"run_id": result.run_id, "init_from": f"runs:/{result.run_id}", "losses": result.losses}


def _run_key(p: dict[str, Any]) -> list[Any]:
    return [p["run"]["run_id"], p["run"]["checkpoint"], _training_key(p)]


@task(
    name="evaluate",
    cache_policy=step_cache(lambda p: [_run_key(p), p["settings"].evaluate], "medml.evaluate.run"),
)
def evaluate_encoder(run: dict[str, Any], settings: Settings, workspace: str) -> dict[str, Any]:
    """The contract's metrics of a trained run, logged to it (medml.evaluate.run.evaluate_run)."""
    from medml.evaluate.run import evaluate_run

    metrics = evaluate_run(run["run_id"], settings, _ws(workspace), Path(run["checkpoint"]))
    get_run_logger().info("run %s: %s %s", run["run_id"], metrics["split"], metrics)
    return jsonable({"run_id": run["run_id"], "metrics": metrics})


@task(
    name="package",
    cache_policy=step_cache(
        lambda p: [_run_key(p), p["settings"].prototypes], "medml.registry.package"
    ),
)
def package_model(run: dict[str, Any], settings: Settings, workspace: str) -> dict[str, Any]:
    """Log the run's encoder with train-split prototypes as an MLflow model
    (medml.registry.package.package_run)."""
    from medml.registry.package import package_run

    uri = package_run(run["run_id"], settings, _ws(workspace), Path(run["checkpoint"]))
    get_run_logger().info("packaged %s", uri)
    return {"run_id": run["run_id"], "model_uri": uri}


def _sweep_key(p: dict[str, Any]) -> list[Any]:
    # The worker count changes how fast, never what: it stays out of the key.
    budget = p["settings"].sweep.model_dump(exclude={"workers"})
    return [_training_key(p), list(p["losses"]), budget]


@task(name="sweep", cache_policy=step_cache(_sweep_key, "medml.sweep"))
def sweep_losses(settings: Settings, workspace: str, losses: list[str]) -> dict[str, Any]:
    """The loss comparison under one parent MLflow run (medml.sweep.sweep); its fits run as
    ``sweep-fit`` tasks on the task runner that ``sweep.workers`` asks for."""
    from medml.sweep import sweep

    o = sweep_runner(settings)
    with reachable_api(o), task_runner(o) as runner:
        result = sweep(settings, _ws(workspace), losses, mapper=mapped_fits(runner))
    get_run_logger().info(
        "sweep %s: %s (table %s)", result.parent_run_id, result.verdict.text, result.table_md
    )
    return jsonable(
        {
            "parent_run_id": result.parent_run_id,
            "winner": result.verdict.winner,
            "significant": result.verdict.significant,
            "verdict": result.verdict.text,
            "trials": result.trials,
            "table_csv": str(result.table_csv),
            "table_md": str(result.table_md),
            "figure": str(result.figure),
        }
    )


@task(name="sweep-fit", persist_result=False, cache_policy=NO_CACHE)
def sweep_fit(job: dict[str, Any]) -> dict[str, Any]:
    """One fit of the loss comparison: a trial's fold or a final seed (medml.sweep.run_fit).

    Not cached by Prefect: the Optuna study is what lets a killed sweep resume.
    """
    from medml.sweep import run_fit

    return jsonable(run_fit(job))


def sweep_runner(settings: Settings) -> OrchestrationConfig:
    """``sweep.workers`` > 1: a local Dask cluster of that many workers (or the configured
    remote one); otherwise one fit at a time."""
    o, workers = settings.orchestration, settings.sweep.workers
    if o.task_runner == "dask" and o.dask_address:
        return o
    if workers > 1:
        return o.model_copy(update={"task_runner": "dask", "dask_workers": workers})
    return o.model_copy(update={"task_runner": "threads", "max_workers": 1})


def mapped_fits(runner: Any) -> Any:
    """A ``medml.sweep.Mapper``: each fit a ``sweep-fit`` task on ``runner``, results in order."""

    def run(jobs: list[Any]) -> list[dict[str, Any]]:
        futures = [runner.submit(sweep_fit, {"job": job.to_dict()}) for job in jobs]
        return [future.result() for future in futures]

    return run


def run_stale(workspace: str, key: str = "run_id") -> Any:
    """Checks a cached training result: its MLflow run still exists (not deleted)."""

    def check(result: dict[str, Any]) -> str | None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        from medml.tracking import configure

        configure(Workspace(Path(workspace)))
        try:
            run = MlflowClient().get_run(result[key])
        except MlflowException:
            return f"MLflow run {result[key]} is gone"
        return None if run.info.lifecycle_stage == "active" else f"run {result[key]} deleted"

    return check


# ------------------------------------------------------------------------ prototypes


def _support_key(p: dict[str, Any]) -> list[Any]:
    ws = Workspace(Path(p["workspace"]))
    data = (
        file_digest(p["support"])
        if p["support"]
        else catalog_fingerprint(ws.catalog_url, with_splits=True, split="train")
    )
    return [p["model_uri"], p["settings"].prototypes, data, ws.mlflow_uri]


@task(name="prototypes", cache_policy=step_cache(_support_key, "medml.registry.register"))
def build_prototypes(
    model_uri: str, settings: Settings, workspace: str, support: str | None = None
) -> dict[str, Any]:
    """K-shot support set (given, or drawn from the train split) -> prototypes -> registered
    model version with the configured alias (medml.registry.register.register_from_catalog)."""
    from medml.registry.register import register_from_catalog

    reg, support_csv = register_from_catalog(
        model_uri, settings.prototypes, _ws(workspace), support
    )
    get_run_logger().info("registered %s version %s as @%s", reg.name, reg.version, reg.alias)
    return jsonable({**asdict(reg), "support_csv": str(support_csv)})


def version_stale(workspace: str) -> Any:
    """Checks a cached registration: the model version still exists in the registry."""

    def check(result: dict[str, Any]) -> str | None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        from medml.tracking import configure

        configure(Workspace(Path(workspace)))
        try:
            MlflowClient().get_model_version(result["name"], result["version"])
        except MlflowException:
            return f"model version {result['name']}/{result['version']} is gone"
        return None

    return check


# ---------------------------------------------------------------------- batch inference


@task(name="resolve-model", cache_policy=NO_CACHE)
def resolve_model(model_uri: str, workspace: str) -> dict[str, str]:
    """An alias (``models:/NAME@champion``) to the version it points at now, plus a tag that
    changes whenever that model changes (the predictions' cache keys use it)."""
    from medml.tracking import configure, resolve_model_uri

    configure(_ws(workspace))
    resolved = resolve_model_uri(model_uri)
    return {"uri": resolved["uri"], "tag": digest(*resolved.values())}


@task(name="discover-inputs", cache_policy=NO_CACHE)
def discover(inputs: list[str]) -> list[dict[str, str | None]]:
    """NIfTI files and DICOM series folders under the given paths, in input order, as rows
    (``path``, and ``error`` when known unusable) (medml.predict.batch.inputs_frame)."""
    from medml.predict.batch import inputs_frame

    found = inputs_frame(inputs)
    get_run_logger().info("%d inputs under %d given paths", len(found), len(inputs))
    return found.to_dict("records")


@task(
    name="predict-batch",
    cache_policy=step_cache(
        lambda p: [
            p["model_tag"],
            p["settings"].predict,
            [(r.get("scan_id"), r.get("error")) for r in p["rows"]],
            paths_fingerprint(r["path"] for r in p["rows"]),
        ],
        "medml.predict.batch",
        "medml.tracking",
    ),
)
def predict_batch(
    model_uri: str, model_tag: str, rows: list[dict[str, str]], settings: Settings, workspace: str
) -> list[dict[str, Any]]:
    """Predict one batch of inputs (medml.predict.batch.predict_frame); rows come back as JSON
    records (null, never NaN) so a cached batch needs no file of its own."""
    from medml.predict.batch import predict_frame
    from medml.tracking import configure

    configure(_ws(workspace))
    summary = predict_frame(
        model_uri,
        pd.DataFrame(rows),
        None,
        settings.predict.batch_size,
        progress=False,
        # the task runner maps batches in parallel already: no process pool per task
        workers=settings.predict.workers or 0,
    )
    get_run_logger().info("%d inputs, %d errors", summary.n_inputs, summary.n_errors)
    frame = summary.rows
    return jsonable(frame.astype(object).where(frame.notna(), None).to_dict("records"))


@task(name="write-predictions", cache_policy=NO_CACHE)
def write_predictions(
    parts: list[list[dict[str, Any]]], out: str, settings: Settings
) -> dict[str, Any]:
    """The batches, in input order, as the prediction files (medml.predict.batch.write_rows)."""
    from medml.predict.batch import write_rows

    records = [row for part in parts for row in part]
    return jsonable(write_rows(records, Path(out), settings.predict.formats))
