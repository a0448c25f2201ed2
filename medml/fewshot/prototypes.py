"""Prototypes: the renormalised mean of each class's L2-normalised embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medml.io import atomic_path

UNKNOWN = "unknown"


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)


@dataclass
class Prototypes:
    """Class centroids on the unit sphere, their spread, and the decision rule."""

    vectors: np.ndarray  # (C, E), unit length
    classes: list[str]
    spread: np.ndarray  # (C,) mean cosine distance of support embeddings to their centroid
    temperature: float = 0.1
    unknown_threshold: float | None = None

    def similarities(self, emb: np.ndarray) -> np.ndarray:
        """Cosine similarity of each embedding to each prototype, ``(N, C)``."""
        return _normalise(emb) @ self.vectors.T

    def probabilities(self, sims: np.ndarray) -> np.ndarray:
        logits = sims / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, emb: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Predicted class names (or 'unknown'), probabilities and best similarity."""
        sims = self.similarities(emb)
        best = sims.max(axis=1)
        names = [self.classes[i] for i in sims.argmax(axis=1)]
        if self.unknown_threshold is not None:
            names = [UNKNOWN if b < self.unknown_threshold else n for n, b in zip(names, best)]
        return names, self.probabilities(sims), best

    def save(self, path: Path) -> None:
        with atomic_path(path, suffix=".npz") as tmp, tmp.open("wb") as fh:
            np.savez(
                fh,
                vectors=self.vectors,
                classes=np.array(self.classes),
                spread=self.spread,
                temperature=self.temperature,
                unknown_threshold=np.nan
                if self.unknown_threshold is None
                else self.unknown_threshold,
            )

    @classmethod
    def load(cls, path: Path) -> Prototypes:
        with np.load(path, allow_pickle=False) as z:
            thr = float(z["unknown_threshold"])
            return cls(
                z["vectors"],
                [str(c) for c in z["classes"]],
                z["spread"],
                float(z["temperature"]),
                None if np.isnan(thr) else thr,
            )


def build_prototypes(
    emb: np.ndarray,
    labels: Sequence[str],
    temperature: float = 0.1,
    unknown_threshold: float | None = None,
) -> Prototypes:
    """Centroid per class of L2-normalised embeddings, renormalised to unit length."""
    emb = _normalise(np.asarray(emb, dtype=np.float32))
    labels = np.asarray(labels)
    classes = sorted(set(labels.tolist()))
    vectors, spread = [], []
    for c in classes:
        members = emb[labels == c]
        centre = _normalise(members.mean(axis=0))
        vectors.append(centre)
        spread.append(float(np.mean(1.0 - members @ centre)))
    return Prototypes(np.stack(vectors), classes, np.array(spread), temperature, unknown_threshold)


def select_support(labels: Sequence[str], shots: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of up to ``shots`` examples per class, drawn without replacement."""
    labels = np.asarray(labels)
    picks = []
    for c in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == c)
        picks.extend(rng.choice(idx, size=min(shots, len(idx)), replace=False).tolist())
    return np.array(sorted(picks), dtype=int)
