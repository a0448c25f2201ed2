"""The loss comparison's parts on hand-made inputs: folds, statistics, verdict, spaces, pruner."""

from __future__ import annotations

import math

import optuna
import pytest
from scipy import stats as sps

from medml.config import Settings
from medml.losses import build_loss
from medml.losses.registry import LOSSES
from medml.sweep import search
from medml.sweep.folds import make_folds
from medml.sweep.jobs import MedianPruning
from medml.sweep.stats import NO_WINNER, mean_ci, paired, verdict


def _rows(n_patients: int, classes: int) -> list[dict[str, str]]:
    rows = []
    for p in range(n_patients):
        for visit in range(1 + p % 2):  # every other patient has a follow-up scan
            rows.append(
                {"scan_id": f"s{p}-{visit}", "patient_key": f"p{p}", "label": f"c{p % classes}"}
            )
    return rows


def test_folds_are_patient_disjoint_stratified_and_seeded():
    rows = _rows(40, 4)
    folds = make_folds(rows, 4, seed=3)
    patient = {r["scan_id"]: r["patient_key"] for r in rows}
    label = {r["scan_id"]: r["label"] for r in rows}
    assert sorted(i for f in folds for i in f.val_ids) == sorted(patient)  # each scan once
    for f in folds:
        val_patients = {patient[i] for i in f.val_ids}
        assert val_patients.isdisjoint(patient[i] for i in f.train_ids)
        assert set(f.train_ids) | set(f.val_ids) == set(patient)
        counts = {c: sum(label[i] == c for i in f.val_ids) for c in {"c0", "c1", "c2", "c3"}}
        assert min(counts.values()) >= 2, counts  # every class in every validation fold
        assert 8 <= len(val_patients) <= 12
    assert make_folds(rows, 4, seed=3) == folds
    assert make_folds(rows, 4, seed=4) != folds


def test_folds_refuse_classes_with_fewer_patients_than_folds():
    rows = _rows(12, 4)  # 3 patients per class
    with pytest.raises(ValueError, match="at least 4 patients per class"):
        make_folds(rows, 4, seed=0)


def test_mean_ci_uses_student_t():
    ci = mean_ci([0.5, 0.7, float("nan")])
    assert ci.n == 2 and ci.mean == pytest.approx(0.6)
    assert ci.ci95 == pytest.approx(12.7062 * 0.141421 / math.sqrt(2), rel=1e-4)
    assert mean_ci([0.4]).ci95 == 0.0 and mean_ci([]).n == 0


def test_paired_statistic_on_hand_made_numbers():
    base = {f"seed{i}": v for i, v in enumerate([0.50, 0.55, 0.60, 0.52, 0.58, 0.61])}
    lift = [0.10, 0.20, 0.30, 0.15, 0.05, 0.12]
    better = {k: v + d for (k, v), d in zip(base.items(), lift)}
    result = paired("a", "b", better, base, resamples=5000)
    assert result.n == 6 and result.mean_diff == pytest.approx(sum(lift) / 6)
    assert result.p_value == pytest.approx(2 / 2**6)  # exact: all six differences positive
    assert 0.05 <= result.ci_low < result.mean_diff < result.ci_high <= 0.30
    assert result.significant
    # three pairs can never reach p < 0.05 (smallest exact p = 2 / 2^3), even all positive
    few = paired("a", "b", dict(list(better.items())[:3]), base)
    assert few.p_value == pytest.approx(0.25) and not few.significant
    # a pair with an undefined score is dropped, not counted as a zero difference
    holes = paired("a", "b", {**better, "seed0": float("nan")}, base)
    assert holes.n == 5
    # mixed signs: not significant, the CI spans 0
    mixed = paired("a", "b", {k: v + d for (k, v), d in zip(base.items(), [0.1, -0.1] * 3)}, base)
    assert mixed.ci_low < 0 < mixed.ci_high and not mixed.significant
    diffs = [0.1, -0.1] * 3
    assert mixed.p_value == pytest.approx(sps.wilcoxon(diffs).pvalue)


def test_verdict_states_a_winner_only_beyond_the_noise():
    keys = [f"s{i}" for i in range(8)]
    softmax = dict(zip(keys, [0.50, 0.52, 0.49, 0.51, 0.50, 0.53, 0.48, 0.50]))
    close = {k: v + (0.005 if i % 2 else -0.004) for i, (k, v) in enumerate(softmax.items())}
    far = {k: v + 0.1 + 0.01 * i for i, (k, v) in enumerate(softmax.items())}
    noise = verdict({"triplet": close, "softmax": softmax}, "softmax", "MAP@R")
    assert noise.winner == "none" and not noise.significant
    assert noise.text.startswith(NO_WINNER)
    clear = verdict({"triplet": far, "arcface": close, "softmax": softmax}, "softmax", "MAP@R")
    assert clear.winner == "triplet" and clear.significant
    assert {(c.a, c.b) for c in clear.comparisons} == {
        ("triplet", "softmax"),
        ("arcface", "softmax"),
        ("triplet", "arcface"),  # the top two, the baseline not among them
    }
    tie = verdict({"triplet": far, "arcface": far, "softmax": softmax}, "softmax", "MAP@R")
    assert tie.winner == "none" and "cannot be told apart" in tie.text
    base_leads = verdict({"triplet": close, "softmax": far}, "softmax", "MAP@R")
    assert base_leads.winner == "softmax" and base_leads.text.startswith(NO_WINNER)


@pytest.mark.parametrize("loss", LOSSES.names())
def test_every_search_space_builds_its_loss(loss):
    """A sampled setting of each loss's space is valid settings and a constructible loss."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    params = search.suggest(trial, loss)
    assert "train.lr" in params  # the same knobs for the baseline as for every other loss
    settings = search.with_params(Settings(), loss, params)
    assert settings.loss.name == loss and settings.train.lr == params["train.lr"]
    bundle = build_loss(settings.loss, 4, 16)
    assert bundle.loss is not None


def test_median_pruning_hook_uses_optunas_pruner_on_the_folds_history():
    class FakeTrainer:
        should_stop = False

    reference = ((0.5, 0.6, 0.7), (0.4, 0.65, 0.8))
    bad, good = MedianPruning(reference, 1, 1), MedianPruning(reference, 1, 1)
    trainer_bad, trainer_good = FakeTrainer(), FakeTrainer()
    for epoch, (b, g) in enumerate([(0.1, 0.5), (0.2, 0.7)], start=1):
        bad.on_epoch_end(trainer_bad, epoch, {"val_mean_average_precision_at_r": b})
        good.on_epoch_end(trainer_good, epoch, {"val_mean_average_precision_at_r": g})
    assert bad.pruned_at == 2 and trainer_bad.should_stop  # epoch 1 is warm-up
    assert good.pruned_at is None and not trainer_good.should_stop
    lone = MedianPruning((), 1, 0)  # no finished trial yet: never pruned
    lone.on_epoch_end(FakeTrainer(), 1, {"val_mean_average_precision_at_r": 0.0})
    assert lone.pruned_at is None


def test_storage_is_the_workspace_or_the_postgres_catalog(tmp_path, monkeypatch):
    from medml.workspace import Workspace

    ws = Workspace(tmp_path)
    assert search.storage_url(ws) == f"sqlite:///{tmp_path / 'optuna.db'}"
    monkeypatch.setenv("MEDML_CATALOG_URL", "postgresql+psycopg://u@127.0.0.1/test")
    assert search.storage_url(ws) == "postgresql+psycopg://u@127.0.0.1/test"
