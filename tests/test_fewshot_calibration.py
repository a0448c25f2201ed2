"""Prototype maths: margin, nearest support, temperature by NLL, open-set threshold by FAR."""

from __future__ import annotations

import numpy as np
import pytest

from medml.fewshot.calibration import (
    calibrate,
    fit_temperature,
    impostor_scores,
    nll,
    threshold_for_far,
)
from medml.fewshot.prototypes import UNKNOWN, Prototypes, build_prototypes


def test_margin_and_nearest_support_round_trip_through_npz(tmp_path):
    emb = np.array([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    p = build_prototypes(
        emb,
        ["a", "a", "b", "c"],
        scan_ids=["s1", "s2", "s3", "s4"],
        thumbnails=np.zeros((4, 3, 2, 2), np.float16),
    )
    d = p.decide(np.array([[1.0, 0.05, 0.0]]), k=2)
    sims = p.similarities(np.array([[1.0, 0.05, 0.0]]))[0]
    assert d.names == ["a"]
    assert d.margin[0] == pytest.approx(np.sort(sims)[-1] - np.sort(sims)[-2])
    assert d.neighbours == [["s1", "s2"]]  # s1 is at 2.9 degrees, s2 at 3.5
    p.save(tmp_path / "p.npz")
    q = Prototypes.load(tmp_path / "p.npz")
    assert q.support_ids == ["s1", "s2", "s3", "s4"] and q.support_labels == ["a", "a", "b", "c"]
    assert q.thumbnails.shape == (4, 3, 2, 2)
    np.testing.assert_allclose(q.support, p.support)
    assert q.decide(np.array([[0.0, 0.0, 2.0]]), k=1).neighbours == [["s4"]]


def test_temperature_fit_recovers_the_generating_temperature():
    rng = np.random.default_rng(0)
    sims = rng.uniform(-1, 1, size=(4000, 4))
    true_t = 0.25
    p = np.exp(sims / true_t)
    p /= p.sum(axis=1, keepdims=True)
    target = np.array([rng.choice(4, p=row) for row in p])
    fitted = fit_temperature(sims, target)
    assert fitted == pytest.approx(true_t, rel=0.1)
    assert nll(sims, target, fitted) < nll(sims, target, 0.05)
    assert nll(sims, target, fitted) < nll(sims, target, 2.0)


def test_threshold_accepts_at_most_the_target_share_of_impostors():
    imp = np.linspace(0.0, 0.9, 10)  # 0.0, 0.1, ..., 0.9
    t = threshold_for_far(imp, 0.2)
    assert (imp >= t).mean() == pytest.approx(0.2)  # 0.8 and 0.9 accepted
    assert 0.7 < t <= 0.8 + 1e-6
    assert threshold_for_far(imp, 0.0) > 0.9
    assert threshold_for_far(imp, 1.0) == -1.0
    sims = np.array([[0.9, 0.2, 0.5]])
    assert impostor_scores(sims, np.array([0]))[0] == pytest.approx(0.5)


def test_calibrate_fits_threshold_and_curve_on_validation_clusters():
    rng = np.random.default_rng(3)
    centres = np.eye(3, 8)
    labels = np.repeat(["a", "b", "c"], 30)
    emb = centres[np.repeat(np.arange(3), 30)] + 0.3 * rng.normal(size=(90, 8))
    protos = build_prototypes(emb[::2], labels[::2], temperature=1.0)
    fitted, cal = calibrate(protos, emb[1::2], list(labels[1::2]), target_far=0.1)
    assert cal.n_val == 45 and cal.nll_after <= cal.nll_before
    assert fitted.temperature < 1.0  # separable clusters: sharper than T=1
    assert fitted.unknown_threshold == cal.unknown_threshold
    assert cal.false_accept_rate <= 0.1
    far = cal.curve.false_accept_rate.to_numpy()
    frr = cal.curve.false_reject_rate.to_numpy()
    assert np.all(np.diff(far) <= 0) and np.all(np.diff(frr) >= 0)
    # A point between classes is refused; one on a centre is accepted.
    names = fitted.decide(np.array([np.ones(8) * 0.0 + np.eye(8)[5], centres[1]]), k=0).names
    assert names == [UNKNOWN, "b"]
    with pytest.raises(ValueError, match="at least 2"):
        calibrate(protos, emb[:1], ["a"], 0.1)
