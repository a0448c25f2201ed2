"""Prototypes: the renormalised mean of each class's L2-normalised embeddings.

Besides the centroids, a :class:`Prototypes` keeps its support set (unit embeddings, content
scan ids, labels and, optionally, small middle-slice thumbnails) so a prediction can name the
k nearest support scans for a person to check. Everything is stored as plain arrays in an
``.npz`` (no pickle).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medml.fewshot.rules import DecisionRule, make_rule, restore_rule
from medml.io import atomic_path

UNKNOWN = "unknown"


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)


@dataclass
class Decision:
    """Per-query outcome of :meth:`Prototypes.decide`."""

    names: list[str]  # predicted class, or 'unknown'
    probs: np.ndarray  # (N, C) temperature-scaled softmax over cosine similarities
    best: np.ndarray  # (N,) similarity to the nearest prototype
    margin: np.ndarray  # (N,) best minus runner-up similarity (inf with a single class)
    neighbours: list[list[str]]  # ids of the k nearest support scans (empty without support)
    neighbour_idx: np.ndarray  # (N, k) their indices in the support arrays


@dataclass
class Prototypes:
    """Class centroids on the unit sphere, their spread, the decision rule and the support set."""

    vectors: np.ndarray  # (C, E), unit length
    classes: list[str]
    spread: np.ndarray  # (C,) mean cosine distance of support embeddings to their centroid
    temperature: float = 0.1
    unknown_threshold: float | None = None
    support: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # (S, E)
    support_ids: list[str] = field(default_factory=list)
    support_labels: list[str] = field(default_factory=list)
    thumbnails: np.ndarray | None = None  # (S, 3, H, W) float16 middle slices, or None
    rule: DecisionRule | None = None  # None: nearest centroid with ``temperature``

    def similarities(self, emb: np.ndarray) -> np.ndarray:
        """Cosine similarity of each embedding to each prototype, ``(N, C)``."""
        return _normalise(emb) @ self.vectors.T

    def probabilities(self, sims: np.ndarray, temperature: float | None = None) -> np.ndarray:
        """Softmax of ``sims / temperature`` over classes."""
        logits = sims / (temperature or self.temperature)
        logits = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def nearest_support(self, emb: np.ndarray, k: int) -> np.ndarray:
        """Indices ``(N, min(k, S))`` of the most similar support scans, best first."""
        if len(self.support) == 0 or k <= 0:
            return np.zeros((len(emb), 0), dtype=int)
        sims = _normalise(emb) @ self.support.T
        return np.argsort(-sims, axis=1, kind="stable")[:, : min(k, len(self.support))]

    def decide(self, emb: np.ndarray, k: int = 3) -> Decision:
        """Class (or 'unknown'), probabilities, similarity, margin and k nearest support scans."""
        sims = self.similarities(emb)
        ordered = np.sort(sims, axis=1)
        best = ordered[:, -1]
        margin = best - ordered[:, -2] if sims.shape[1] > 1 else np.full(len(sims), np.inf)
        probs = self.probabilities(sims)
        if self.rule is not None and self.rule.name != "centroid":
            probs = self._rule_probabilities(emb)
        names = [self.classes[i] for i in probs.argmax(axis=1)]
        if self.unknown_threshold is not None:
            names = [UNKNOWN if b < self.unknown_threshold else n for n, b in zip(names, best)]
        idx = self.nearest_support(emb, k)
        neighbours = [[self.support_ids[j] for j in row] for row in idx]
        return Decision(names, probs, best, margin, neighbours, idx)

    def _rule_probabilities(self, emb: np.ndarray) -> np.ndarray:
        """The rule's probabilities in this object's class order."""
        assert self.rule is not None
        self.rule.temperature = self.temperature  # calibration fits the temperature here
        probs = self.rule.probabilities(emb)
        order = [self.rule.classes.index(c) for c in self.classes]
        return probs[:, order]

    def predict(self, emb: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Predicted class names (or 'unknown'), probabilities and best similarity."""
        d = self.decide(emb, k=0)
        return d.names, d.probs, d.best

    def save(self, path: Path) -> None:
        """Write every array to one ``.npz`` (atomic; loadable without pickle)."""
        arrays = {
            "vectors": self.vectors,
            "classes": np.array(self.classes),
            "spread": self.spread,
            "temperature": self.temperature,
            "unknown_threshold": np.nan
            if self.unknown_threshold is None
            else self.unknown_threshold,
            "support": np.asarray(self.support, dtype=np.float32),
            "support_ids": np.array(self.support_ids, dtype=str),
            "support_labels": np.array(self.support_labels, dtype=str),
        }
        if self.thumbnails is not None:
            arrays["thumbnails"] = self.thumbnails.astype(np.float16)
        if self.rule is not None:
            arrays["rule_name"] = np.array(self.rule.name)
            arrays["rule_classes"] = np.array(self.rule.classes)
            arrays["rule_temperature"] = np.array(self.rule.temperature)
            arrays.update({f"rule__{k}": v for k, v in self.rule.state.items()})
        with atomic_path(path, suffix=".npz") as tmp, tmp.open("wb") as fh:
            np.savez(fh, **arrays)

    @classmethod
    def load(cls, path: Path) -> Prototypes:
        """Read a file written by :meth:`save` (older files without a support set load too)."""
        with np.load(path, allow_pickle=False) as z:
            thr = float(z["unknown_threshold"])
            has = set(z.files)
            rule = None
            if "rule_name" in has:
                state = {k.removeprefix("rule__"): z[k] for k in z.files if k.startswith("rule__")}
                rule = restore_rule(
                    str(z["rule_name"]), [str(c) for c in z["rule_classes"]],
                    float(z["rule_temperature"]), state,
                )  # fmt: skip
            return cls(
                z["vectors"],
                [str(c) for c in z["classes"]],
                z["spread"],
                float(z["temperature"]),
                None if np.isnan(thr) else thr,
                z["support"] if "support" in has else np.zeros((0, 0), np.float32),
                [str(s) for s in z["support_ids"]] if "support_ids" in has else [],
                [str(s) for s in z["support_labels"]] if "support_labels" in has else [],
                z["thumbnails"] if "thumbnails" in has else None,
                rule,
            )


def build_prototypes(
    emb: np.ndarray,
    labels: Sequence[str],
    temperature: float = 0.1,
    unknown_threshold: float | None = None,
    scan_ids: Sequence[str] | None = None,
    thumbnails: np.ndarray | None = None,
    rule: str = "centroid",
    rule_options: dict[str, float] | None = None,
) -> Prototypes:
    """Centroid per class of L2-normalised embeddings, renormalised to unit length.

    With ``scan_ids`` the support embeddings are kept, for the k-nearest-support answer.
    ``rule`` (a name of :data:`medml.fewshot.rules.RULES`) decides classes and probabilities;
    the centroids still give the reported similarity and margin.
    """
    emb = _normalise(np.asarray(emb, dtype=np.float32))
    labels = np.asarray(labels)
    classes = sorted(set(labels.tolist()))
    vectors, spread = [], []
    for c in classes:
        members = emb[labels == c]
        centre = _normalise(members.mean(axis=0))
        vectors.append(centre)
        spread.append(float(np.mean(1.0 - members @ centre)))
    protos = Prototypes(
        np.stack(vectors), classes, np.array(spread), temperature, unknown_threshold
    )
    if scan_ids is not None:
        protos.support = emb
        protos.support_ids = [str(s) for s in scan_ids]
        protos.support_labels = [str(v) for v in labels.tolist()]
        protos.thumbnails = thumbnails
    if rule != "centroid":
        protos.rule = make_rule(rule, temperature, **(rule_options or {})).fit(emb, labels)
    return protos


def select_support(labels: Sequence[str], shots: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of up to ``shots`` examples per class, drawn without replacement."""
    labels = np.asarray(labels)
    picks = []
    for c in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == c)
        picks.extend(rng.choice(idx, size=min(shots, len(idx)), replace=False).tolist())
    return np.array(sorted(picks), dtype=int)
