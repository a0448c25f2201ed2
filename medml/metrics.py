"""Metrics on embeddings: the contract's P@1, R-precision, MAP@R, centroid accuracy and episodes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    roc_auc_score,
)

from medml.fewshot.prototypes import build_prototypes, select_support

RETRIEVAL = ("precision_at_1", "r_precision", "mean_average_precision_at_r")


def retrieval_metrics(emb: np.ndarray, labels: Sequence[int]) -> dict[str, float]:
    """P@1, R-precision and MAP@R with each query's own split as reference (self excluded)."""
    labels_t = torch.as_tensor(np.asarray(labels))
    if len(labels_t) < 2:
        return {k: float("nan") for k in RETRIEVAL}
    # CustomKNN over cosine similarity: exact, and no faiss dependency.
    calc = AccuracyCalculator(
        include=RETRIEVAL, k="max_bin_count", knn_func=CustomKNN(CosineSimilarity())
    )
    emb_t = torch.as_tensor(np.asarray(emb, dtype=np.float32))
    scores = calc.get_accuracy(emb_t, labels_t)
    return {k: float(scores[k]) for k in RETRIEVAL}


def centroid_metrics(
    support_emb: np.ndarray,
    support_labels: Sequence[str],
    query_emb: np.ndarray,
    query_labels: Sequence[str],
    classes: Sequence[str],
    ordinal: bool,
    temperature: float = 0.1,
    rule: str = "centroid",
    rule_options: dict[str, float] | None = None,
) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro AUROC (+ quadratic kappa if ordinal) of the decision
    ``rule`` (nearest centroid by default) with the support set as its prototypes."""
    protos = build_prototypes(
        support_emb, support_labels, temperature, rule=rule, rule_options=rule_options
    )
    pred, probs, _ = protos.predict(query_emb)
    truth = list(query_labels)
    out = {
        "accuracy": float(accuracy_score(truth, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(truth, pred)),
    }
    out["auroc"] = _macro_auroc(truth, probs, protos.classes)
    if ordinal:
        rank = {c: i for i, c in enumerate(classes)}
        t = [rank[c] for c in truth]
        p = [rank.get(c, -1) for c in pred]
        out["kappa_quadratic"] = float(cohen_kappa_score(t, p, weights="quadratic"))
        out["mean_absolute_stage_error"] = float(np.mean(np.abs(np.subtract(t, p))))
    return out


def _macro_auroc(truth: Sequence[str], probs: np.ndarray, classes: Sequence[str]) -> float:
    present = sorted(set(truth))
    if len(present) < 2:
        return float("nan")
    if len(classes) == 2:
        return float(roc_auc_score([c == classes[1] for c in truth], probs[:, 1]))
    return float(
        roc_auc_score(truth, probs, multi_class="ovr", average="macro", labels=list(classes))
    )


def fewshot_episodes(
    support_emb: np.ndarray,
    support_labels: Sequence[str],
    query_emb: np.ndarray,
    query_labels: Sequence[str],
    ways: int,
    shots: int,
    queries: int,
    episodes: int,
    seed: int = 0,
) -> dict[str, float]:
    """N-way K-shot episodes: mean nearest-centroid accuracy and its 95 % confidence half-width.

    Support examples come from ``support_*`` and queries from ``query_*``; pass the same arrays
    for both to draw support and queries from one pool (they never overlap within an episode).
    """
    rng = np.random.default_rng(seed)
    s_lab, q_lab = np.asarray(support_labels), np.asarray(query_labels)
    same_pool = support_emb is query_emb
    eligible = [
        c
        for c in sorted(set(q_lab.tolist()) & set(s_lab.tolist()))
        if (s_lab == c).sum() >= shots + (1 if same_pool else 0)
    ]
    ways = min(ways, len(eligible))
    if ways < 2:
        return {
            "ways": ways,
            "shots": shots,
            "queries": queries,
            "episodes": 0,
            "accuracy": float("nan"),
            "ci95": float("nan"),
        }
    accs = []
    for _ in range(episodes):
        chosen = rng.choice(eligible, size=ways, replace=False)
        s_idx, q_idx = [], []
        for c in chosen:
            pool_s = np.flatnonzero(s_lab == c)
            sup = rng.choice(pool_s, size=shots, replace=False)
            pool_q = (
                np.setdiff1d(np.flatnonzero(q_lab == c), sup)
                if same_pool
                else np.flatnonzero(q_lab == c)
            )
            s_idx.extend(sup)
            q_idx.extend(rng.choice(pool_q, size=min(queries, len(pool_q)), replace=False))
        protos = build_prototypes(support_emb[s_idx], s_lab[s_idx])
        pred, _, _ = protos.predict(query_emb[q_idx])
        accs.append(float(np.mean(np.asarray(pred) == q_lab[q_idx])))
    accs_np = np.asarray(accs)
    ci = 1.96 * accs_np.std(ddof=1) / np.sqrt(len(accs_np)) if len(accs_np) > 1 else 0.0
    return {
        "ways": int(ways),
        "shots": shots,
        "queries": queries,
        "episodes": episodes,
        "accuracy": float(accs_np.mean()),
        "ci95": float(ci),
    }


__all__ = ["centroid_metrics", "fewshot_episodes", "retrieval_metrics", "select_support"]
