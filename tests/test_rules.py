"""Decision rules on hand-built embeddings: each does what its definition says."""

import numpy as np
import pytest

from medml.fewshot.prototypes import Prototypes, build_prototypes
from medml.fewshot.rules import RULES, make_rule, select_rule


def _unit(*rows):
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_prior_correction_moves_a_borderline_query_to_the_frequent_class():
    # 9 'a' support scans around +x, 1 'b' around +y; the query sits exactly between.
    support = _unit(*([[1, 0.05]] * 9), [0.05, 1])
    labels = ["a"] * 9 + ["b"]
    query = _unit([1, 1])
    plain = make_rule("centroid", 0.1).fit(support, labels).probabilities(query)[0]
    prior = make_rule("centroid-prior", 0.1).fit(support, labels).probabilities(query)[0]
    assert plain[0] == pytest.approx(plain[1], abs=1e-5)  # equidistant: a coin toss
    ratio = (prior[0] / prior[1]) / (plain[0] / plain[1])
    assert ratio == pytest.approx(9.0, rel=1e-3)  # Bayes: odds times the prior ratio 9:1


def test_kmeans_serves_a_class_with_two_modes_where_one_centroid_fails():
    # class 'a' has two modes (+x and -x): its centroid points at +z, between them, near 'b'.
    a = _unit(*([[1, 0, 0.3]] * 5), *([[-1, 0, 0.3]] * 5))
    b = _unit(*([[0, 0.6, 0.8]] * 5))
    support, labels = np.concatenate([a, b]), ["a"] * 10 + ["b"] * 5
    query = _unit([-1, 0.2, 0.3])  # near a's second mode
    assert make_rule("centroid").fit(support, labels).predict(query) == ["b"]
    assert make_rule("kmeans").fit(support, labels).predict(query) == ["a"]


def test_knn_votes_by_the_nearest_support_scans():
    support = _unit([1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.2, 0.8])
    labels = ["a", "a", "b", "b", "b"]
    rule = make_rule("knn").fit(support, labels)
    rule.k = 2
    assert rule.predict(_unit([1, 0.05])) == ["a"]
    probs = rule.probabilities(_unit([1, 0.05], [0.05, 1]))
    assert np.allclose(probs.sum(axis=1), 1) and probs[0, 0] > 0.99 and probs[1, 1] > 0.99


def test_linear_probe_separates_and_gives_proper_probabilities():
    rng = np.random.default_rng(0)
    a = rng.normal([2, 0, 0], 0.3, (20, 3))
    b = rng.normal([0, 2, 0], 0.3, (20, 3))
    rule = make_rule("linear").fit(np.concatenate([a, b]), ["a"] * 20 + ["b"] * 20)
    probs = rule.probabilities(np.concatenate([a, b]))
    assert np.allclose(probs.sum(axis=1), 1)
    assert (probs[:20, 0] > 0.5).all() and (probs[20:, 1] > 0.5).all()


def test_selection_uses_validation_and_the_rule_survives_saving(tmp_path):
    support = _unit(*([[1, 0.05]] * 9), [0.05, 1])
    labels = ["a"] * 9 + ["b"]
    # validation: mostly 'a' scans near the border, where the prior decides
    val = _unit(*([[0.9, 1]] * 8), [0.2, 1])
    choice = select_rule(support, labels, val, ["a"] * 8 + ["b"], ["centroid", "centroid-prior"])
    assert choice.name == "centroid-prior"
    assert choice.scores["centroid-prior"]["accuracy"] > choice.scores["centroid"]["accuracy"]
    protos = build_prototypes(support, labels, 0.1, rule="centroid-prior")
    protos.save(tmp_path / "p.npz")
    loaded = Prototypes.load(tmp_path / "p.npz")
    assert loaded.rule is not None and loaded.rule.name == "centroid-prior"
    assert np.allclose(loaded.decide(val).probs, protos.decide(val).probs)
    assert loaded.decide(val).names == ["a"] * 8 + ["b"]


@pytest.mark.parametrize("name", RULES.names())
def test_each_registered_name_builds_the_rule_of_that_name(name):
    assert make_rule(name).name == name


@pytest.mark.parametrize("name", RULES.names())
def test_every_rule_fits_predicts_and_orders_classes_like_the_prototypes(name):
    rng = np.random.default_rng(1)
    centres = np.eye(4)[:3] * 3
    y = np.repeat(np.arange(3), 6)
    emb = centres[y] + rng.normal(0, 0.4, (18, 4))
    labels = np.array(["z", "b", "m"])[y]  # not alphabetical in index order
    protos = build_prototypes(emb, labels, rule=name)
    decision = protos.decide(emb, k=0)
    assert np.allclose(decision.probs.sum(axis=1), 1)
    assert np.mean(np.array(decision.names) == labels) > 0.9, name


def test_temperature_fit_recovers_the_temperature_that_generated_the_labels():
    from medml.fewshot.rules import fit_temperature

    rng = np.random.default_rng(0)
    centroids = _unit([1, 0], [0, 1])
    rule = make_rule("centroid-prior").fit(centroids.repeat(5, axis=0), ["a"] * 5 + ["b"] * 5)
    x = _unit(*rng.normal(0, 1, (4000, 2)))
    rule.temperature = 0.25
    p = rule.probabilities(x)
    labels = np.where(rng.random(len(x)) < p[:, 0], "a", "b")
    rule.temperature = 0.05  # a wrong start
    assert fit_temperature(rule, x, labels) == pytest.approx(0.25, rel=0.1)
