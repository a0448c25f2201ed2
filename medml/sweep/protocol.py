"""The Reality Check protocol (Musgrave et al., ECCV 2020) over the catalog, in MLflow.

1. K folds over train+val (patient-grouped, class-stratified); the test split waits.
2. The same budget per loss: ``trials`` Optuna TPE trials, each scored by the mean over the
   folds of the best-epoch validation MAP@R; the median pruner stops hopeless folds early.
3. Each loss's best setting is fitted ``seeds`` times (on all of train+val, for the best
   trial's mean best epoch; or, with ``final: folds``, once per fold and seed) and evaluated
   once on test; paired comparisons and the verdict follow (``medml.sweep.stats``).

MLflow: one parent run (description = the table and the verdict; tags ``medml.winner``,
``medml.significant``; the figure), one child per loss (its final test metrics), and under it
one run per fit (``triplet · fold 2 · trial 7``, ``triplet · best · seed 1``).

Parallelism is the caller's: ``mapper`` runs a list of :class:`FitJob` and returns their
records in order (``flows.sweep`` maps them as Prefect tasks on Dask). Trials of all losses
advance in lock step, one trial per loss at a time with its folds in parallel, so TPE sees
exactly the history it would see serially. Optuna's storage makes a killed sweep resume
without redoing finished trials, and final fits are kept in the study too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pandas as pd
from mlflow import MlflowClient

from medml.catalog import Catalog
from medml.config import Settings
from medml.data.splits import ensure_splits
from medml.io import atomic_path, atomic_write_text, jsonable
from medml.lock import writes_workspace
from medml.planning import resolve
from medml.sweep import report, search
from medml.sweep.folds import Fold, make_folds
from medml.sweep.jobs import FitJob, run_fit
from medml.sweep.stats import Verdict, verdict
from medml.tracking import configure, use_experiment
from medml.workspace import Workspace

log = logging.getLogger(__name__)

Mapper = Callable[[list[FitJob]], list[dict[str, Any]]]
SEP = " · "
# Sections that cannot change what a trial's fit produces (``plan`` acts through the resolved
# settings, which are hashed); a new section elsewhere starts new studies, to be safe.
NOT_FITTING = {
    "workspace", "synth", "ingest", "plan", "prototypes", "predict", "orchestration", "pacs",
    "sweep",
}  # fmt: skip


def serial(jobs: list[FitJob]) -> list[dict[str, Any]]:
    """Run the jobs one after the other in this process."""
    return [run_fit(job) for job in jobs]


@dataclass
class SweepResult:
    parent_run_id: str
    table_md: Path
    table_csv: Path
    figure: Path
    verdict: Verdict
    summaries: list[report.LossSummary]
    trials: dict[str, int] = field(default_factory=dict)


@dataclass
class _Plan:
    settings: Settings
    ws: Workspace
    losses: list[str]
    folds: list[Fold]
    pool_ids: tuple[str, ...]
    key: str  # the studies' identity (data, folds, fitting settings)
    parent: str = ""
    loss_runs: dict[str, str] = field(default_factory=dict)


@writes_workspace("sweep")
def sweep(
    settings: Settings,
    ws: Workspace,
    losses: Sequence[str],
    mapper: Mapper = serial,
) -> SweepResult:
    """Run (or resume) the protocol for ``losses`` with ``settings.sweep``'s budget.

    Holds the workspace's writer lock for the whole sweep; its fits write under it, also from
    Dask worker processes (``medml.sweep.jobs.run_fit``).
    """
    plan = _plan(settings, ws, list(dict.fromkeys(losses)))
    _mlflow_runs(plan)
    studies = {
        loss: search.open_study(ws, f"medml-sweep-{loss}-{plan.key}", settings)
        for loss in plan.losses
    }
    _tune(plan, studies, mapper)
    finals = _final_fits(plan, studies, mapper)
    return _conclude(plan, studies, finals)


# ----------------------------------------------------------------------------------- plan


def _plan(settings: Settings, ws: Workspace, losses: list[str]) -> _Plan:
    sc = settings.sweep
    if sc.metric not in report.TABLE_METRICS:
        raise ValueError(
            f"sweep.metric {sc.metric!r} is not a compared metric; one of "
            + ", ".join(report.TABLE_METRICS)
        )
    # The workspace's plans fill unset keys (as train does), so the study key sees them.
    settings = resolve(settings, ws).single_model()  # each fit is one encoder, no ensemble
    if sc.epochs:
        settings = settings.model_copy(
            update={"train": settings.train.model_copy(update={"epochs": sc.epochs})}
        )
    configure(ws)
    use_experiment(ws, settings.train.experiment)
    catalog = Catalog(ws.catalog_url)
    ensure_splits(catalog, settings.split)
    pool = [s for s in catalog.list_scans(class_set="base") if s["split"] in ("train", "val")]
    folds = make_folds(pool, sc.folds, sc.fold_seed)
    pool_ids = tuple(s["scan_id"] for s in pool)
    key = search.digest(
        settings.model_dump(mode="json", exclude=NOT_FITTING | {"loss"}),
        sorted(s["content_hash"] for s in pool),
        [sc.folds, sc.fold_seed, sc.sampler_seed, sc.startup_trials],
        [sc.prune_startup_trials, sc.prune_warmup_epochs],
    )
    return _Plan(settings, ws, losses, folds, pool_ids, key)


def _budget(sc: Any, epochs: int) -> str:
    return (
        f"{sc.folds} folds, {sc.trials} trials per loss, {epochs} epochs per trial "
        f"(median pruning), {sc.seeds} seed{'s' if sc.seeds > 1 else ''}, final fits: {sc.final}"
    )


def _sweep_key(plan: _Plan) -> str:
    sc = plan.settings.sweep
    return search.digest(
        plan.key, plan.losses, sc.trials, sc.seeds, sc.final, sc.metric, sc.baseline
    )


def _mlflow_runs(plan: _Plan) -> None:
    """The parent run and one run per loss: found again on a resume, else created."""
    client = MlflowClient()
    exp = mlflow.get_experiment_by_name(plan.settings.train.experiment).experiment_id
    key = _sweep_key(plan)

    def find(extra: str) -> str | None:
        hits = client.search_runs([exp], f"tags.`medml.sweep_key` = '{key}'{extra}", max_results=1)
        return hits[0].info.run_id if hits else None

    sc = plan.settings.sweep
    plan.parent = (
        find(" and tags.`medml.role` = 'sweep'")
        or client.create_run(
            exp,
            run_name="sweep" + SEP + ", ".join(plan.losses),
            tags={"medml.sweep_key": key, "medml.role": "sweep"},
        ).info.run_id
    )
    for param, value in {
        "losses": ",".join(plan.losses), "folds": sc.folds, "trials": sc.trials,
        "seeds": sc.seeds, "final": sc.final, "metric": sc.metric, "baseline": sc.baseline,
        "epochs_per_trial": plan.settings.train.epochs, "model.backbone":
        plan.settings.model.backbone, "n_train_val": len(plan.pool_ids),
    }.items():  # fmt: skip
        _log_param_once(client, plan.parent, param, value)
    for i, loss in enumerate(plan.losses):
        found = find(f" and tags.`medml.role` = 'loss' and tags.`medml.loss` = '{loss}'")
        plan.loss_runs[loss] = found or client.create_run(
            exp,
            run_name=loss,
            tags={
                "medml.sweep_key": key, "medml.role": "loss", "medml.loss": loss,
                "mlflow.parentRunId": plan.parent,
                "mlflow.runColor": report.PALETTE[i % len(report.PALETTE)],
            },
        ).info.run_id  # fmt: skip


def _log_param_once(client: MlflowClient, run_id: str, key: str, value: Any) -> None:
    if key not in client.get_run(run_id).data.params:
        client.log_param(run_id, key, value)


# ----------------------------------------------------------------------------------- tune


def _tune(plan: _Plan, studies: dict[str, optuna.Study], mapper: Mapper) -> None:
    """Trials in lock step: one per loss at a time, that trial's folds as parallel jobs."""
    target = plan.settings.sweep.trials
    while True:
        batch: list[tuple[str, optuna.Trial, list[FitJob]]] = []
        for loss in plan.losses:
            study = studies[loss]
            if len(search.finished(study)) >= target:
                continue
            trial = search.next_trial(study, plan.settings)
            params = search.suggest(trial, loss)
            batch.append((loss, trial, _trial_jobs(plan, study, loss, trial, params)))
        if not batch:
            return
        log.info("sweep: trial round %s", ", ".join(f"{b[0]} #{b[1].number + 1}" for b in batch))
        records = mapper([job for *_, jobs in batch for job in jobs])
        by_key = {r["key"]: r for r in records}
        for loss, trial, jobs in batch:
            _tell(studies[loss], trial, [by_key[j.key] for j in jobs])


def _trial_jobs(
    plan: _Plan, study: optuna.Study, loss: str, trial: optuna.Trial, params: dict[str, Any]
) -> list[FitJob]:
    settings = search.with_params(plan.settings, loss, params)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    jobs = []
    for fold in plan.folds:
        reference = tuple(
            tuple(t.user_attrs["curves"][fold.index]) for t in complete if "curves" in t.user_attrs
        )
        jobs.append(
            _job(
                plan,
                loss,
                settings,
                key=f"{loss}/trial-{trial.number}/fold-{fold.index}",
                run_name=SEP.join([loss, f"fold {fold.index + 1}", f"trial {trial.number + 1}"]),
                train_ids=fold.train_ids,
                val_ids=fold.val_ids,
                tags={
                    "medml.role": "trial",
                    "medml.trial": str(trial.number),
                    "medml.fold": str(fold.index),
                },  # fmt: skip
                prune_reference=reference,
            )
        )
    return jobs


def _job(plan: _Plan, loss: str, settings: Settings, **fields: Any) -> FitJob:
    """A fit of ``loss`` in this sweep's workspace, under the loss's MLflow run."""
    return FitJob(
        loss=loss,
        settings=settings.model_dump(mode="json"),
        workspace=str(plan.ws.root),
        parent_run_id=plan.loss_runs[loss],
        **fields,
    )


def _tell(study: optuna.Study, trial: optuna.Trial, records: list[dict[str, Any]]) -> None:
    """Record a trial: its folds' curves, best epochs and runs; its score or its pruning."""
    curves = [[_num(v) for v in r["curve"]] for r in records]
    scores = [_num(r["best_score"]) for r in records]
    trial.set_user_attr("curves", curves)
    trial.set_user_attr("best_epochs", [r["best_epoch"] for r in records])
    trial.set_user_attr("run_ids", [r["run_id"] for r in records])
    for epoch in range(max(map(len, curves), default=0)):  # the folds' mean curve
        values = [c[epoch] for c in curves if epoch < len(c) and math.isfinite(c[epoch])]
        if values:
            trial.report(sum(values) / len(values), epoch + 1)
    if any(r["pruned"] for r in records):
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    elif all(math.isfinite(s) for s in scores):
        study.tell(trial, sum(scores) / len(scores))
    else:  # an undefined validation score (a fold without two scans of a class)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


# ----------------------------------------------------------------------------------- final


def _final_fits(
    plan: _Plan, studies: dict[str, optuna.Study], mapper: Mapper
) -> dict[str, list[dict[str, Any]]]:
    """Each loss's best setting, ``seeds`` times, evaluated once on test (kept in the study)."""
    wanted: dict[str, list[FitJob]] = {}
    for loss in plan.losses:
        best = _best(studies[loss])
        if best is None:
            log.warning("sweep: %s has no completed trial; it gets no final fits", loss)
            continue
        wanted[loss] = _final_jobs(plan, loss, best)
    todo = [
        j for loss, jobs in wanted.items() for j in jobs
        if studies[loss].user_attrs.get(j.key) is None
    ]  # fmt: skip
    for record in mapper(todo) if todo else []:
        loss = record["key"].split("/", 1)[0]
        studies[loss].set_user_attr(record["key"], jsonable(record))
    return {loss: [studies[loss].user_attrs[j.key] for j in jobs] for loss, jobs in wanted.items()}


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def refit_epochs(best: optuna.trial.FrozenTrial) -> int:
    """The best trial's mean best epoch over its folds (at least 1)."""
    epochs = best.user_attrs["best_epochs"]
    return max(1, round(sum(epochs) / len(epochs)))


def _final_jobs(plan: _Plan, loss: str, best: optuna.trial.FrozenTrial) -> list[FitJob]:
    sc = plan.settings.sweep
    tuned = search.with_params(plan.settings, loss, best.params)
    epochs = refit_epochs(best)
    jobs = []
    units = [(s, None) for s in range(sc.seeds)]
    if sc.final == "folds":
        units = [(s, f) for s in range(sc.seeds) for f in plan.folds]
    for s, fold in units:
        # Fresh seeds: the trials' seed helped pick the best setting on validation, and its
        # luck would carry over to test (the winner's curse).
        seed = plan.settings.train.seed + 1 + s
        train_cfg = {"seed": seed} if fold else {"seed": seed, "epochs": epochs}
        one = tuned.model_copy(update={"train": tuned.train.model_copy(update=train_cfg)})
        where = f"seed {s + 1}" + (f"{SEP}fold {fold.index + 1}" if fold else "")
        unit = f"seed-{seed}" + (f"-fold-{fold.index}" if fold else "")
        jobs.append(
            _job(
                plan,
                loss,
                one,
                key=f"{loss}/best-{best.number}-{sc.final}-{epochs}/{unit}",
                run_name=SEP.join([loss, "best", where]),
                train_ids=fold.train_ids if fold else plan.pool_ids,
                val_ids=fold.val_ids if fold else (),
                tags={
                    "medml.role": "final",
                    "medml.seed": str(seed),
                    "medml.trial": str(best.number),
                },  # fmt: skip
                evaluate=True,
            )
        )
    return jobs


# ----------------------------------------------------------------------------------- conclude


def _summary(
    plan: _Plan, loss: str, study: optuna.Study, finals: list[dict[str, Any]]
) -> report.LossSummary:
    done = search.finished(study)
    best = _best(study)
    summary = report.LossSummary(
        loss=loss,
        trials=len(done),
        pruned=sum(t.state == optuna.trial.TrialState.PRUNED for t in done),
        cv_score=float(best.value) if best else float("nan"),
        best_params=dict(best.params) if best else {},
        epochs=refit_epochs(best) if best else 0,
        fold_curves=[list(map(_num, c)) for c in best.user_attrs["curves"]] if best else [],
        run_id=plan.loss_runs[loss],
    )
    for record in finals:
        unit = record["key"].rsplit("/", 1)[1]
        for metric, value in report.test_values(record["test"]).items():
            summary.test.setdefault(metric, {})[unit] = value
    return summary


def _conclude(
    plan: _Plan, studies: dict[str, optuna.Study], finals: dict[str, list[dict[str, Any]]]
) -> SweepResult:
    sc = plan.settings.sweep
    summaries = [_summary(plan, loss, studies[loss], finals.get(loss, [])) for loss in plan.losses]
    result = verdict(
        {s.loss: s.test.get(sc.metric, {}) for s in summaries},
        sc.baseline, report.SHORT.get(sc.metric, sc.metric), sc.alpha, sc.bootstrap,
        sc.sampler_seed,
    )  # fmt: skip
    pairing = "same seed and fold" if sc.final == "folds" else "same seeds"
    budget = _budget(sc, plan.settings.train.epochs)
    text = report.markdown(summaries, result, sc.metric, budget, pairing)
    stem = plan.ws.reports / f"sweep-{plan.parent}"
    md, csv, png = (stem.with_suffix(s) for s in (".md", ".csv", ".png"))
    atomic_write_text(md, text)
    atomic_write_text(csv, pd.DataFrame(report.rows(summaries)).to_csv(index=False))
    with atomic_path(png, suffix=".png") as tmp:
        report.figure(summaries, sc.metric, tmp)
    _log_conclusion(plan, summaries, result, text, (md, csv, png))
    return SweepResult(
        plan.parent, md, csv, png, result, summaries, {s.loss: s.trials for s in summaries}
    )


def _log_conclusion(
    plan: _Plan,
    summaries: list[report.LossSummary],
    result: Verdict,
    text: str,
    files: tuple[Path, ...],
) -> None:
    client, sc = MlflowClient(), plan.settings.sweep
    for s in summaries:  # the per-loss runs: select them and press Compare
        # The compare view's parallel-coordinates plot starts on the first three differing
        # params in name order: loss, lr, refit_epochs are the ones every loss has.
        shared = {"loss": s.loss, "lr": s.best_params.get("train.lr", plan.settings.train.lr),
                  "refit_epochs": s.epochs}  # fmt: skip
        tuned = {f"tuned.{k}": v for k, v in s.best_params.items()}
        for param, value in {**shared, **tuned}.items():
            _log_param_once(client, s.run_id, param, value)
        # The compare view plots the first metric the runs share, in name order: the compared
        # one is named to come first ("compared_" < "cv_" < "test_").
        metrics = {
            f"compared_test_{sc.metric}": s.stat(sc.metric).mean,
            "cv_val_mean_average_precision_at_r": s.cv_score,
        }
        for m in report.TABLE_METRICS:
            st = s.stat(m)
            if st.n:
                metrics[f"test_{m}"], metrics[f"test_{m}_ci95"] = st.mean, st.ci95
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        for k, v in metrics.items():
            client.log_metric(s.run_id, k, v)
            client.log_metric(plan.parent, f"{s.loss}.{k}", v)
        client.set_tag(s.run_id, "mlflow.note.content", _loss_note(s))
        client.set_terminated(s.run_id)
    client.set_tag(plan.parent, "mlflow.note.content", text)
    client.set_tag(plan.parent, "medml.winner", result.winner)
    client.set_tag(plan.parent, "medml.significant", str(result.significant).lower())
    for path in files:
        client.log_artifact(plan.parent, str(path), artifact_path="comparison")
    client.set_terminated(plan.parent)


def _loss_note(s: report.LossSummary) -> str:
    return (
        f"{s.loss}: best of {s.trials} trials ({s.pruned} pruned), CV validation MAP@R "
        f"{s.cv_score:.3f}; refit for {s.epochs} epochs. Settings: "
        + ", ".join(f"{k}={v}" for k, v in sorted(s.best_params.items()))
    )
