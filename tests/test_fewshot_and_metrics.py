import numpy as np
import pytest

from medml.fewshot.prototypes import UNKNOWN, Prototypes, build_prototypes, select_support
from medml.metrics import centroid_metrics, fewshot_episodes, retrieval_metrics


def test_prototype_is_renormalised_mean_with_spread():
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    p = build_prototypes(emb, ["a", "a", "b"])
    assert p.classes == ["a", "b"]
    np.testing.assert_allclose(p.vectors[0], [np.sqrt(0.5), np.sqrt(0.5)])
    np.testing.assert_allclose(p.vectors[1], [-1.0, 0.0])
    assert p.spread[0] == pytest.approx(1 - np.sqrt(0.5))
    assert p.spread[1] == pytest.approx(0.0)


def test_predict_probabilities_and_unknown(tmp_path):
    p = build_prototypes(np.eye(3), ["x", "y", "z"], temperature=0.5, unknown_threshold=0.6)
    names, probs, best = p.predict(np.array([[2.0, 0.1, 0.0], [1.0, 1.0, 1.0]]))
    assert names == ["x", UNKNOWN]  # the second is 0.577 from every prototype: below 0.6
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    expected = np.exp(np.array([0.998752, 0.049938, 0.0]) / 0.5)
    np.testing.assert_allclose(probs[0], expected / expected.sum(), rtol=1e-4)
    p.save(tmp_path / "p.npz")
    q = Prototypes.load(tmp_path / "p.npz")
    assert q.classes == p.classes and q.unknown_threshold == 0.6
    np.testing.assert_allclose(q.vectors, p.vectors)


def test_retrieval_metrics_hand_computed():
    # Class 0 at angles 0 and 10 degrees, class 1 at 90 and 100; one impostor of class 1 at 5.
    ang = np.deg2rad([0, 10, 5, 90, 100])
    emb = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    labels = [0, 0, 1, 1, 1]
    m = retrieval_metrics(emb, labels)
    # Nearest neighbours: 0->2 (wrong), 10->5 (wrong), 5->0 (wrong), 90->100, 100->90.
    assert m["precision_at_1"] == pytest.approx(2 / 5)
    # R-precision: R=1 for class 0 (1 same-class other), R=2 for class 1.
    # q0:[2] 0/1; q10:[2] 0/1; q5: [0,10] 0/2; q90: [100,5] 1/2; q100: [90,5] 1/2
    assert m["r_precision"] == pytest.approx((0 + 0 + 0 + 0.5 + 0.5) / 5)
    # MAP@R: q90 -> (1/1)/2 = 0.5; q100 -> 0.5; others 0
    assert m["mean_average_precision_at_r"] == pytest.approx(1.0 / 5)


def test_centroid_metrics_and_episodes_on_separable_data():
    rng = np.random.default_rng(0)
    centres = np.eye(4)[:, :4]
    labels = np.repeat(["A", "B", "C", "D"], 10)
    emb = centres[np.repeat(np.arange(4), 10)] + 0.05 * rng.normal(size=(40, 4))
    m = centroid_metrics(
        emb[::2], labels[::2], emb[1::2], labels[1::2], ["A", "B", "C", "D"], ordinal=True
    )
    assert m["accuracy"] == 1.0 and m["balanced_accuracy"] == 1.0 and m["auroc"] == 1.0
    assert m["kappa_quadratic"] == 1.0 and m["mean_absolute_stage_error"] == 0.0
    fs = fewshot_episodes(emb, labels, emb, labels, ways=3, shots=2, queries=3, episodes=50)
    assert fs["accuracy"] == 1.0 and fs["ways"] == 3 and fs["ci95"] == 0.0


def test_episodes_on_noise_are_near_chance_with_a_confidence_interval():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(5), 20)
    emb = rng.normal(size=(100, 8))
    fs = fewshot_episodes(
        emb, labels, emb, labels, ways=5, shots=3, queries=5, episodes=300, seed=2
    )
    assert abs(fs["accuracy"] - 0.2) < 0.05
    assert 0 < fs["ci95"] < 0.02


def test_select_support_takes_k_per_class():
    labels = ["a"] * 5 + ["b"] * 2
    picks = select_support(labels, 3, np.random.default_rng(0))
    assert sorted(np.asarray(labels)[picks].tolist()) == ["a", "a", "a", "b", "b"]
