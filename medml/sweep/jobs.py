"""One unit of the protocol's work: a fit (a trial's fold, or a final seed), run anywhere.

A :class:`FitJob` is plain data (JSON-able), so a Dask worker in another process runs it as
well as the calling process: it names its MLflow parent run explicitly instead of relying on
an active run, and it carries what the median pruner needs to decide alone.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from mlflow import MlflowClient

from medml.catalog import Catalog
from medml.config import Settings
from medml.evaluate.run import evaluate_run
from medml.sweep.folds import pick
from medml.train import train
from medml.train.hooks import Hook
from medml.train.trainer import SELECTION_METRIC
from medml.workspace import Workspace


@dataclass(frozen=True)
class FitJob:
    """Everything one fit needs; ``val_ids`` empty: a refit that keeps the last epoch."""

    key: str  # stable identity, e.g. "triplet/trial-3/fold-1" or "triplet/best/seed-2"
    loss: str
    settings: dict[str, Any]  # Settings as JSON (trial parameters applied)
    workspace: str
    run_name: str
    parent_run_id: str
    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    # Validation curves of this fold in the loss's finished trials (the pruner's reference).
    prune_reference: tuple[tuple[float, ...], ...] = ()
    evaluate: bool = False  # evaluate on the test split afterwards

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MedianPruning(Hook):
    """Optuna's ``MedianPruner`` on this fit's validation MAP@R, epoch by epoch.

    The pruner judges against an in-memory study holding the same fold's curves of the
    loss's finished trials, so folds of one trial decide independently (they may run in
    parallel processes) and the same history always gives the same decision. A pruned fit
    stops cleanly (its MLflow run ends FINISHED, tagged ``medml.pruned``).
    """

    def __init__(self, reference: tuple[tuple[float, ...], ...], startup: int, warmup: int):
        self.pruned_at: int | None = None
        self.study = optuna.create_study(
            direction="maximize",
            pruner=optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup),
        )
        for curve in reference:
            values = {i + 1: v for i, v in enumerate(curve) if math.isfinite(v)}
            if values:
                self.study.add_trial(
                    optuna.trial.create_trial(
                        value=max(values.values()),
                        intermediate_values=values,
                        distributions={},
                        params={},
                    )
                )
        self.trial = self.study.ask()

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
        score = metrics.get(SELECTION_METRIC, float("nan"))
        if not math.isfinite(score):
            return
        self.trial.report(score, epoch)
        if self.trial.should_prune():
            self.pruned_at = epoch
            trainer.should_stop = True


# The sweep that made the job holds the workspace's writer lock for its whole run (in its own
# process); a fit may run in a Dask worker process, where taking the lock again would find it
# busy. So a job trains with train's undecorated body, as the lock's delegate, the way
# torchrun's secondary ranks write under rank 0's lock.
_train_under_sweep_lock = inspect.unwrap(train)


def run_fit(job: FitJob | dict[str, Any]) -> dict[str, Any]:
    """Train one fit (and evaluate it on test when asked); return a JSON-able record.

    Only for jobs of :func:`medml.sweep.sweep`, which holds the workspace lock meanwhile.
    """
    if isinstance(job, dict):
        job = FitJob(**{**job, "prune_reference": tuple(map(tuple, job["prune_reference"]))})
    settings = Settings.model_validate(job.settings)
    ws = Workspace(Path(job.workspace))
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.sweep.torch_threads)  # results independent of the workers
    try:
        return _fit(job, settings, ws)
    finally:
        torch.set_num_threads(threads)


def _fit(job: FitJob, settings: Settings, ws: Workspace) -> dict[str, Any]:
    scans = Catalog(ws.catalog_url).list_scans(class_set="base")
    hooks: list[Hook] = []
    pruning = None
    if job.val_ids:
        sc = settings.sweep
        pruning = MedianPruning(
            job.prune_reference, sc.prune_startup_trials, sc.prune_warmup_epochs
        )
        hooks.append(pruning)
    fitted = _train_under_sweep_lock(
        settings,
        ws,
        progress=False,
        run_name=job.run_name,
        nested=True,
        tags={**job.tags, "mlflow.parentRunId": job.parent_run_id, "medml.loss": job.loss},
        train_scans=pick(scans, job.train_ids),
        val_scans=pick(scans, job.val_ids),
        hooks=hooks,
    )
    pruned = pruning is not None and pruning.pruned_at is not None
    if pruned:
        MlflowClient().set_tag(fitted.run_id, "medml.pruned", f"after epoch {pruning.pruned_at}")
    record: dict[str, Any] = {
        "key": job.key,
        "run_id": fitted.run_id,
        "curve": [h.get(SELECTION_METRIC, float("nan")) for h in fitted.history],
        "best_epoch": fitted.best_epoch,
        "best_score": fitted.best_score,
        "epochs_run": fitted.epochs_run,
        "pruned": pruned,
    }
    if job.evaluate:
        metrics = evaluate_run(fitted.run_id, settings, ws, fitted.checkpoint)
        record["test"] = metrics
    return record
