"""Evaluate an encoder on the catalog: the contract's metrics in one dictionary.

- retrieval (P@1, R-precision, MAP@R) and nearest-centroid metrics on the evaluated split's
  base classes, with prototypes from the training split;
- few-shot episodes on base classes (support from the training split, queries from held-out
  patients) and, when the catalog has them, on novel classes never trained on (support and
  queries both drawn from the novel scans, never overlapping within an episode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from medml.catalog import Catalog
from medml.config import EvaluateConfig, PreprocessConfig
from medml.data.dataset import cached_dataset, items_from_scans
from medml.evaluate.metrics import centroid_metrics, fewshot_episodes, retrieval_metrics
from medml.models.encoder import Encoder
from medml.models.inference import embed_dataset
from medml.workspace import Workspace


@dataclass
class Embedded:
    """Embeddings of a set of catalog scans with their class names and ids."""

    emb: np.ndarray
    labels: np.ndarray
    scan_ids: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def embed_scans(
    encoder: Encoder,
    ws: Workspace,
    pp: PreprocessConfig,
    scans: list[dict[str, Any]],
    batch_size: int,
) -> Embedded:
    """Embed catalog scans through the persistent cache."""
    emb, _ = embed_dataset(
        encoder, cached_dataset(ws, pp, items_from_scans(ws, scans, [])), batch_size
    )
    return Embedded(emb, np.array([s["label"] for s in scans]), [s["scan_id"] for s in scans])


def base_scans(catalog: Catalog, split: str) -> list[dict[str, Any]]:
    return [s for s in catalog.list_scans(split=split) if (s.get("class_set") or "base") == "base"]


def novel_scans(catalog: Catalog) -> list[dict[str, Any]]:
    return [s for s in catalog.list_scans() if s.get("class_set") == "novel"]


def embed_split(
    encoder: Encoder, ws: Workspace, pp: PreprocessConfig, split: str, batch_size: int
) -> Embedded:
    """Embeddings of one split's labelled base-class scans."""
    return embed_scans(encoder, ws, pp, base_scans(Catalog(ws.catalog_url), split), batch_size)


def evaluate_encoder(
    encoder: Encoder,
    ws: Workspace,
    pp: PreprocessConfig,
    cfg: EvaluateConfig,
    split: str | None = None,
    keep: dict[str, Embedded] | None = None,
) -> dict[str, Any]:
    """The contract's metrics for ``split``; pass ``keep={}`` to receive the embeddings too."""
    split = split or cfg.split
    catalog = Catalog(ws.catalog_url)
    train = embed_scans(encoder, ws, pp, base_scans(catalog, "train"), cfg.batch_size)
    held = embed_scans(encoder, ws, pp, base_scans(catalog, split), cfg.batch_size)
    if len(held) == 0:
        raise ValueError(f"split '{split}' has no labelled scans in the catalog")
    classes = sorted(set(train.labels.tolist()))
    index = {c: i for i, c in enumerate(sorted(set(held.labels.tolist()) | set(classes)))}
    out: dict[str, Any] = {"split": split, "n": len(held)}
    out.update(retrieval_metrics(held.emb, [index[c] for c in held.labels]))
    out.update(
        centroid_metrics(train.emb, train.labels, held.emb, held.labels, classes, cfg.ordinal)
    )
    episodes = (cfg.ways, cfg.shots, cfg.queries, cfg.episodes, cfg.seed)
    base = fewshot_episodes(train.emb, train.labels, held.emb, held.labels, *episodes)
    out["fewshot_base"] = {"classes": "base", "support": "train", **base}
    out["fewshot"] = out["fewshot_base"]
    novel_list = novel_scans(catalog)
    if novel_list:
        novel = embed_scans(encoder, ws, pp, novel_list, cfg.batch_size)
        fs = fewshot_episodes(novel.emb, novel.labels, novel.emb, novel.labels, *episodes)
        out["fewshot_novel"] = {"classes": "novel", "support": "novel", **fs}
        out["fewshot"] = out["fewshot_novel"]
    if keep is not None:
        keep.update({"train": train, split: held})
    return out


def flat_metrics(result: dict[str, Any], prefix: str) -> dict[str, float]:
    """Numeric entries of an evaluation result as MLflow metric names."""
    flat = {f"{prefix}{k}": v for k, v in result.items() if isinstance(v, float)}
    for block in ("fewshot_base", "fewshot_novel"):
        flat.update(
            {
                f"{prefix}{block}_{k}": v
                for k, v in result.get(block, {}).items()
                if isinstance(v, float)
            }
        )
    return {k: v for k, v in flat.items() if np.isfinite(v)}
