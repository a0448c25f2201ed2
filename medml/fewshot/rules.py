"""Decision rules on embeddings: how a support set's embeddings answer a query.

Nearest centroid is the few-shot default (and the contract's metric). The others are there for
data where it loses: imbalanced classes (a centroid ignores priors), classes with several
modes, or enough labels for a classifier. Each rule fits on support embeddings and gives class
probabilities (a proper score, for AUROC); its fitted state is plain arrays (saved in the
prototypes ``.npz``, no pickle). The rule is chosen on validation (:func:`select_rule`).

- ``centroid``: softmax of cosine similarity to the class centroids over a temperature;
- ``centroid-prior``: the same logits plus the log class prior of the support (Bayes' rule
  for a softmax model calibrated on balanced classes);
- ``kmeans``: several centroids per class (k-means on the unit sphere), a class scored by its
  best centroid;
- ``knn``: similarity-weighted vote of the k nearest support embeddings;
- ``linear``: a logistic-regression probe on the support embeddings (scikit-learn).

Each rule is registered by name in :mod:`medml.fewshot.registry` (names only, no numpy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from medml.extensions import import_object
from medml.fewshot.registry import RULES


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


@dataclass
class DecisionRule:
    """Base: ``fit`` on support embeddings, ``probabilities`` for queries ``(N, C)``."""

    name = "base"
    temperature: float = 0.1
    classes: list[str] = field(default_factory=list)
    state: dict[str, np.ndarray] = field(default_factory=dict)  # what ``fit`` learned

    def fit(self, emb: np.ndarray, labels: Sequence[str]) -> DecisionRule:
        self.classes = sorted(set(map(str, labels)))
        self._fit(normalise(emb), np.asarray([self.classes.index(str(v)) for v in labels]))
        return self

    def _fit(self, emb: np.ndarray, y: np.ndarray) -> None:
        raise NotImplementedError

    def probabilities(self, emb: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict(self, emb: np.ndarray) -> list[str]:
        return [self.classes[i] for i in self.probabilities(emb).argmax(axis=1)]

    def _centroids(self, emb: np.ndarray, y: np.ndarray) -> np.ndarray:
        return normalise(np.stack([emb[y == c].mean(axis=0) for c in range(len(self.classes))]))


class Centroid(DecisionRule):
    name = "centroid"

    def _fit(self, emb: np.ndarray, y: np.ndarray) -> None:
        self.state = {"centroids": self._centroids(emb, y)}

    def logits(self, emb: np.ndarray) -> np.ndarray:
        return normalise(emb) @ self.state["centroids"].T / self.temperature

    def probabilities(self, emb: np.ndarray) -> np.ndarray:
        return softmax(self.logits(emb))


class CentroidPrior(Centroid):
    name = "centroid-prior"

    def _fit(self, emb: np.ndarray, y: np.ndarray) -> None:
        super()._fit(emb, y)
        counts = np.bincount(y, minlength=len(self.classes)).astype(np.float64)
        self.state["log_prior"] = np.log(counts / counts.sum()).astype(np.float32)

    def probabilities(self, emb: np.ndarray) -> np.ndarray:
        return softmax(self.logits(emb) + self.state["log_prior"])


class KMeansPrototypes(DecisionRule):
    name = "kmeans"
    per_class: int = 3

    def _fit(self, emb: np.ndarray, y: np.ndarray) -> None:
        from sklearn.cluster import KMeans

        centres, owner = [], []
        for c in range(len(self.classes)):
            members = emb[y == c]
            k = min(self.per_class, len(members))
            km = KMeans(n_clusters=k, n_init=4, random_state=0).fit(members)
            centres.append(normalise(km.cluster_centers_))
            owner += [c] * k
        self.state = {"centres": np.concatenate(centres), "owner": np.asarray(owner)}

    def probabilities(self, emb: np.ndarray) -> np.ndarray:
        sims = normalise(emb) @ self.state["centres"].T
        best = np.full((len(emb), len(self.classes)), -np.inf, dtype=np.float32)
        for c in range(len(self.classes)):
            best[:, c] = sims[:, self.state["owner"] == c].max(axis=1)
        return softmax(best / self.temperature)


class KNNVote(DecisionRule):
    name = "knn"
    k: int = 5

    def _fit(self, emb: np.ndarray, y: np.ndarray) -> None:
        self.state = {"support": emb, "y": y}

    def probabilities(self, emb: np.ndarray) -> np.ndarray:
        support, y = self.state["support"], self.state["y"]
        sims = normalise(emb) @ support.T
        k = min(self.k, len(support))
        idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        weights = np.exp(np.take_along_axis(sims, idx, axis=1) / self.temperature)
        votes = np.zeros((len(emb), len(self.classes)))
        for j in range(k):
            np.add.at(votes, (np.arange(len(emb)), y[idx[:, j]]), weights[:, j])
        votes += 1e-6  # a class no neighbour voted for keeps a tiny probability
        return votes / votes.sum(axis=1, keepdims=True)


class LinearProbe(DecisionRule):
    name = "linear"
    C: float = 1.0  # inverse L2 strength, as scikit-learn's

    def _fit(self, emb: np.ndarray, y: np.ndarray) -> None:
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(C=self.C, max_iter=2000).fit(emb, y)
        coef, intercept = clf.coef_, clf.intercept_
        if len(self.classes) == 2:  # sklearn's binary form: one row for class 1
            coef, intercept = np.vstack([-coef, coef]) / 2, np.hstack([-intercept, intercept]) / 2
        self.state = {"coef": coef.astype(np.float32), "intercept": intercept.astype(np.float32)}

    def probabilities(self, emb: np.ndarray) -> np.ndarray:
        return softmax(normalise(emb) @ self.state["coef"].T + self.state["intercept"])


def make_rule(name: str, temperature: float = 0.1, **options: float) -> DecisionRule:
    """A fresh, unfitted rule by its registered name; ``options`` set its knobs (``k`` of
    knn, ``per_class`` of kmeans, ``C`` of linear); knobs another rule lacks are ignored, so
    one options mapping serves every candidate."""
    rule: DecisionRule = import_object(RULES[name])(temperature=temperature)
    for key, value in options.items():
        if hasattr(type(rule), key) and key not in ("name", "temperature"):
            setattr(rule, key, type(getattr(type(rule), key))(value))
    return rule


def restore_rule(
    name: str, classes: list[str], temperature: float, state: dict[str, np.ndarray]
) -> DecisionRule:
    """A fitted rule from what :attr:`DecisionRule.state` held (e.g. read from an ``.npz``)."""
    rule = make_rule(name, temperature)
    rule.classes, rule.state = list(classes), dict(state)
    return rule


@dataclass(frozen=True)
class RuleChoice:
    """The rule chosen on validation, and every candidate's scores."""

    name: str
    scores: dict[str, dict[str, float]]


def _score(rule: DecisionRule, emb: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    probs = rule.probabilities(emb)
    pred = [rule.classes[i] for i in probs.argmax(axis=1)]
    truth = [str(v) for v in labels]
    out = {
        "accuracy": float(np.mean([p == t for p, t in zip(pred, truth)])),
        "balanced_accuracy": float(balanced_accuracy_score(truth, pred)),
    }
    known = [t in rule.classes for t in truth]
    if len(set(truth)) > 1 and all(known):
        idx = [rule.classes.index(t) for t in truth]
        if len(rule.classes) == 2:
            out["auroc"] = float(roc_auc_score(idx, probs[:, 1]))
        else:
            out["auroc"] = float(
                roc_auc_score(idx, probs, multi_class="ovr", labels=range(len(rule.classes)))
            )
    return out


def select_rule(
    support_emb: np.ndarray,
    support_labels: Sequence[str],
    val_emb: np.ndarray,
    val_labels: Sequence[str],
    candidates: Sequence[str],
    temperature: float = 0.1,
    options: dict[str, float] | None = None,
) -> RuleChoice:
    """The candidate with the best validation accuracy (then AUROC, then the list order)."""
    opts = options or {}
    scores = {
        name: _score(make_rule(name, temperature, **opts).fit(support_emb, support_labels),
                     val_emb, val_labels)
        for name in candidates
    }  # fmt: skip
    order = {name: i for i, name in enumerate(candidates)}
    best = max(
        candidates,
        key=lambda n: (scores[n]["accuracy"], scores[n].get("auroc", 0.0), -order[n]),
    )
    return RuleChoice(best, scores)


def fit_temperature(
    rule: DecisionRule, emb: np.ndarray, labels: Sequence[str], bounds=(1e-3, 10.0)
) -> float:
    """The temperature minimising the rule's negative log-likelihood of ``labels`` (maximum
    likelihood, bounded 1-D search over log T, as temperature scaling does); set on the rule.

    Labels the rule does not know are left out. With a prior-corrected centroid this also
    places the decision threshold: the prior shifts logits that the temperature scales.
    """
    from scipy.optimize import minimize_scalar

    known = [i for i, v in enumerate(labels) if str(v) in rule.classes]
    if not known:
        return rule.temperature
    x = np.asarray(emb)[known]
    y = np.array([rule.classes.index(str(labels[i])) for i in known])

    def nll(log_t: float) -> float:
        rule.temperature = float(np.exp(log_t))
        p = rule.probabilities(x)[np.arange(len(y)), y]
        return float(-np.log(np.clip(p, 1e-12, None)).mean())

    res = minimize_scalar(nll, bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded")
    rule.temperature = float(np.exp(res.x))
    return rule.temperature
