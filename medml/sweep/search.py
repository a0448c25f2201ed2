"""The tuning budget: each loss's search space (``LossSpec.space``), Optuna studies and storage.

A trial's parameters name settings by dotted path: ``margin``, ``scale``, ``miner``,
``options.X`` and ``miner_options.X`` are fields of ``loss:``; ``train.lr`` and
``train.loss_lr`` are the optimiser's. Every loss starts from its library defaults
(``LossConfig(name=...)``), not from the configured loss's values, so no loss is favoured.

Determinism: the sampler is reseeded from (seed, trial number) at every ask, so the sequence
of trials is a function of the finished trials alone: a resumed study proposes what an
uninterrupted one would have, and the worker count never changes it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import optuna

from medml.config import LossConfig, Settings
from medml.losses.registry import LOSSES
from medml.workspace import Workspace

optuna.logging.set_verbosity(optuna.logging.WARNING)

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def suggest(trial: optuna.Trial, loss: str) -> dict[str, Any]:
    """Draw one setting of ``loss``'s search space."""
    params: dict[str, Any] = {}
    for name, entry in LOSSES[loss].space.items():
        kind, *args = entry
        if kind == "float":
            low, high, log = args
            params[name] = trial.suggest_float(name, low, high, log=log)
        elif kind == "int":
            params[name] = trial.suggest_int(name, *args)
        elif kind == "categorical":
            params[name] = trial.suggest_categorical(name, args[0])
        else:
            raise ValueError(f"loss {loss!r}: unknown search-space kind {kind!r} for {name}")
    return params


def with_params(settings: Settings, loss: str, params: dict[str, Any]) -> Settings:
    """The shared settings with ``loss`` at its defaults plus the trial's parameters."""
    loss_fields: dict[str, Any] = {"name": loss}
    train_fields: dict[str, Any] = {}
    for name, value in params.items():
        head, _, rest = name.partition(".")
        if head == "train":
            train_fields[rest] = value
        elif head in ("options", "miner_options"):
            loss_fields.setdefault(head, {})[rest] = value
        else:
            loss_fields[name] = value
    return settings.model_copy(
        update={
            "loss": LossConfig.model_validate(loss_fields),
            "train": settings.train.model_validate({**settings.train.model_dump(), **train_fields}),
        }
    )


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (study and sweep names)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def storage_url(ws: Workspace) -> str:
    """Optuna's storage: the catalog's PostgreSQL database when it has one, else
    ``WS/optuna.db`` (SQLite)."""
    url = ws.catalog_url
    if url.startswith("postgresql"):
        return url
    return f"sqlite:///{ws.root / 'optuna.db'}"


def open_study(ws: Workspace, name: str, settings: Settings) -> optuna.Study:
    """Create or resume the study ``name`` (maximising mean validation MAP@R over folds)."""
    return optuna.create_study(
        study_name=name,
        storage=storage_url(ws),
        direction="maximize",
        load_if_exists=True,
        sampler=sampler_for(settings, 0),
    )


def sampler_for(settings: Settings, trial_number: int) -> optuna.samplers.BaseSampler:
    """TPE seeded from (sampler seed, trial number); random for the first trials."""
    sc = settings.sweep
    return optuna.samplers.TPESampler(
        seed=sc.sampler_seed * 100_003 + trial_number,
        n_startup_trials=sc.startup_trials,
        multivariate=True,
        warn_independent_sampling=False,
    )


def next_trial(study: optuna.Study, settings: Settings) -> optuna.Trial:
    """A trial to evaluate: a leftover of a killed run (its parameters kept), else a new ask."""
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if running:
        return optuna.Trial(study, running[0]._trial_id)
    study.sampler = sampler_for(settings, len(study.trials))
    return study.ask()


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Completed and pruned trials, in order."""
    return study.get_trials(deepcopy=False, states=FINISHED)
