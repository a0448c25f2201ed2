"""Evaluate an encoder on a catalog split: the contract's metrics in one dictionary."""

from __future__ import annotations

from typing import Any

import numpy as np

from medml.catalog import Catalog
from medml.config import EvaluateConfig, PreprocessConfig
from medml.data.dataset import cached_dataset, items_from_scans
from medml.evaluate.metrics import centroid_metrics, fewshot_episodes, retrieval_metrics
from medml.models.encoder import Encoder
from medml.models.inference import embed_dataset
from medml.workspace import Workspace


def embed_split(
    encoder: Encoder,
    ws: Workspace,
    pp: PreprocessConfig,
    split: str,
    classes: list[str],
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and class names of one split's labelled scans (through the cache)."""
    scans = Catalog(ws.catalog_url).list_scans(split=split)
    items = items_from_scans(ws, scans, classes)
    emb, _ = embed_dataset(encoder, cached_dataset(ws, pp, items), batch_size)
    return emb, np.array([s["label"] for s in scans])


def evaluate_encoder(
    encoder: Encoder,
    ws: Workspace,
    pp: PreprocessConfig,
    cfg: EvaluateConfig,
    split: str | None = None,
) -> dict[str, Any]:
    """Retrieval metrics on ``split``, nearest-centroid with train prototypes, few-shot episodes.

    Few-shot episodes draw their K support scans per class from the training split and their
    queries from the evaluated split, so queries are always held-out patients.
    """
    split = split or cfg.split
    train_emb, train_lab = embed_split(encoder, ws, pp, "train", [], cfg.batch_size)
    classes = sorted(set(train_lab.tolist()))
    emb, lab = embed_split(encoder, ws, pp, split, classes, cfg.batch_size)
    if len(lab) == 0:
        raise ValueError(f"split '{split}' has no labelled scans in the catalog")
    index = {c: i for i, c in enumerate(sorted(set(lab.tolist()) | set(classes)))}
    out: dict[str, Any] = {"split": split, "n": int(len(lab))}
    out.update(retrieval_metrics(emb, [index[c] for c in lab]))
    out.update(centroid_metrics(train_emb, train_lab, emb, lab, classes, cfg.ordinal))
    fs = fewshot_episodes(
        train_emb, train_lab, emb, lab, cfg.ways, cfg.shots, cfg.queries, cfg.episodes, cfg.seed
    )
    out["fewshot"] = {"classes": "base", "support": "train", **fs}
    return out


def flat_metrics(result: dict[str, Any], prefix: str) -> dict[str, float]:
    """Numeric entries of an evaluation result as MLflow metric names."""
    flat = {f"{prefix}{k}": v for k, v in result.items() if isinstance(v, float)}
    flat.update(
        {
            f"{prefix}fewshot_{k}": v
            for k, v in result.get("fewshot", {}).items()
            if isinstance(v, float)
        }
    )
    return {k: v for k, v in flat.items() if np.isfinite(v)}
