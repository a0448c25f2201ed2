"""Training: metric learning of the encoder on the catalog's train split, tracked in MLflow.

:class:`Trainer` is the loop (usable from a notebook, without MLflow); :func:`train` runs it
on the catalog's splits inside an MLflow run with the standard hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow

from medml.catalog import Catalog
from medml.config import Settings
from medml.data.splits import ensure_splits, patient_folds
from medml.lock import writes_workspace
from medml.planning import planned_updates, read_plans, resolve
from medml.tracking import configure, log_plans, use_experiment
from medml.train import checkpoint
from medml.train.distributed import Dist
from medml.train.hooks import EarlyStopping, Hook, MLflowLogger, WeightAveraging
from medml.train.trainer import FitResult, Trainer
from medml.workspace import Workspace

EMPTY_CATALOG = "the catalog is empty: run `medml ingest` (or `medml pipeline`) first"


@writes_workspace("train")
def train(
    settings: Settings,
    ws: Workspace,
    progress: bool = True,
    resume: Path | None = None,
    run_name: str | None = None,
    nested: bool = False,
    tags: dict[str, str] | None = None,
    train_scans: Sequence[dict[str, Any]] | None = None,
    val_scans: Sequence[dict[str, Any]] | None = None,
    hooks: Sequence[Hook] = (),
) -> FitResult:
    """Fit an encoder in an MLflow run; keep the best epoch by validation MAP@R.

    Scans default to the catalog's train and val splits (base classes; splits assigned first
    where missing). ``resume`` is a ``last.pt`` to continue from (its MLflow run continues
    too). Returns the run id and the best checkpoint; evaluation and packaging follow as
    their own steps (``medml.evaluate.evaluate_run``, ``medml.registry.package.package_run``).
    """
    settings = resolve(settings, ws)  # the workspace's plans fill what the config left unset
    if settings.train.folds > 1:
        return train_folds(settings, ws, progress, run_name=run_name, nested=nested, tags=tags)
    dist = Dist.from_env()
    catalog = Catalog(ws.catalog_url)
    if dist.main:  # one writer for MLflow and the catalog
        if not catalog.list_scans(labelled=False):
            raise ValueError(EMPTY_CATALOG)
        configure(ws)
        use_experiment(ws, settings.train.experiment)
        ensure_splits(catalog, settings.split)
    dist.barrier()
    if train_scans is None:
        train_scans = catalog.list_scans(split="train", class_set="base")
    if val_scans is None:
        val_scans = catalog.list_scans(split="val", class_set="base")
    saved = checkpoint.load(resume) if resume is not None else None
    run_ctx = (
        mlflow.start_run(
            run_id=saved["run_id"] if saved else None, run_name=run_name, nested=nested, tags=tags
        )
        if dist.main
        else contextlib.nullcontext()
    )
    # Validate the inputs before a run exists: a refused start leaves no FAILED run behind.
    trainer = Trainer(settings, ws, train_scans, val_scans, progress=progress, dist=dist)
    with run_ctx as run:
        run_id = run.info.run_id if dist.main else ""
        trainer.checkpoint_dir = ws.checkpoints / (run_id or "rank")
        trainer.run_id = run_id
        trainer.hooks = [
            *([MLflowLogger(resumed=saved is not None)] if dist.main else []),
            EarlyStopping(settings.train.early_stopping_patience),
            *([WeightAveraging(settings.train.ema_decay)] if settings.train.ema_decay else []),
            *hooks,
        ]
        if dist.main and (plans := read_plans(ws)) is not None and saved is None:
            log_plans(plans, planned_updates(settings, plans))
        trainer.build()
        if saved is not None:
            trainer.restore(saved)
        result = trainer.fit()
    dist.close()
    return result


def train_folds(
    settings: Settings,
    ws: Workspace,
    progress: bool = True,
    run_name: str | None = None,
    nested: bool = False,
    tags: dict[str, str] | None = None,
) -> FitResult:
    """One model per patient-grouped, stratified fold of train+val (each choosing its epoch
    on its held-out fold), as nested runs of one MLflow run whose checkpoint is their
    :class:`~medml.models.encoder.EnsembleEncoder` (``model.ensemble`` = ``train.folds``).

    The test split stays untouched; the reported ``best_score`` is the members' mean
    held-out MAP@R.
    """
    k, member = settings.train.folds, settings.single_model()
    catalog = Catalog(ws.catalog_url)
    if not catalog.list_scans(labelled=False):
        raise ValueError(EMPTY_CATALOG)
    configure(ws)
    use_experiment(ws, settings.train.experiment)
    ensure_splits(catalog, settings.split)
    pool = catalog.list_scans("train", class_set="base") + catalog.list_scans(
        "val", class_set="base"
    )
    folds = patient_folds(pool, k, settings.split.seed)
    with mlflow.start_run(
        run_name=run_name or f"{k}-fold ensemble", nested=nested, tags=tags
    ) as run:
        mlflow.log_params({"train.folds": k, "n_train_val": len(pool)})
        fits = [
            train(member, ws, progress, run_name=f"fold {i + 1}/{k}", nested=True,
                  tags={"medml.fold": str(i + 1), "medml.ensemble": run.info.run_id},
                  train_scans=fit, val_scans=held)
            for i, (fit, held) in enumerate(folds)
        ]  # fmt: skip
        state = {
            f"members.{i}.{name}": tensor
            for i, f in enumerate(fits)
            for name, tensor in checkpoint.load(f.checkpoint).items()
        }
        path = ws.checkpoints / run.info.run_id / "best.pt"
        checkpoint.save(path, state)
        score = float(sum(f.best_score for f in fits) / k)
        mlflow.log_metrics({"best_val_mean_average_precision_at_r": score})
        mlflow.log_artifact(str(path), artifact_path="checkpoints")
    return FitResult(
        run.info.run_id, path, max(f.best_epoch for f in fits), score,
        max(f.epochs_run for f in fits), fits[0].classes,
    )  # fmt: skip


__all__ = ["EMPTY_CATALOG", "FitResult", "Hook", "Trainer", "ensure_splits", "train", "train_folds"]
