"""Log an evaluated run's figures to MLflow: embedding map, confusion matrix, retrieval examples."""

from __future__ import annotations

import logging

import matplotlib.pyplot as plt
import mlflow
import numpy as np

from medml.catalog import Catalog
from medml.config import Settings
from medml.data.dataset import cached_dataset, items_from_scans
from medml.data.transforms import KEY
from medml.evaluate.figures import confusion, embedding_map, retrieval_examples
from medml.fewshot.prototypes import build_prototypes
from medml.models.inference import Embedded
from medml.workspace import Workspace

log = logging.getLogger(__name__)


def _middle_slices(ws: Workspace, settings: Settings, scan_ids: list[str]) -> np.ndarray:
    by_id = {s["scan_id"]: s for s in Catalog(ws.catalog_url).list_scans()}
    ds = cached_dataset(
        ws, settings.preprocess, items_from_scans(ws, [by_id[i] for i in scan_ids], [])
    )
    vols = [np.asarray(ds[i][KEY])[0] for i in range(len(ds))]
    return np.stack([v[:, :, v.shape[2] // 2] for v in vols])


def log_figures(
    settings: Settings, ws: Workspace, train: Embedded, held: Embedded, split: str
) -> None:
    """Into the active run; figures are a courtesy: a failure is logged, never fatal."""
    try:
        protos = build_prototypes(train.emb, train.labels, settings.prototypes.temperature)
        if len(held) >= 5:
            fig = embedding_map(held.emb, held.labels, f"{split} embeddings (t-SNE)")
            mlflow.log_figure(fig, f"figures/embedding_{split}.png")
            plt.close(fig)
        pred, _, _ = protos.predict(held.emb)
        fig = confusion(held.labels, pred, protos.classes, f"nearest centroid, {split}")
        mlflow.log_figure(fig, f"figures/confusion_{split}.png")
        plt.close(fig)
        if len(held) >= 2:
            images = _middle_slices(ws, settings, held.scan_ids)
            fig = retrieval_examples(images, held.labels, held.emb)
            mlflow.log_figure(fig, f"figures/retrieval_{split}.png")
            plt.close(fig)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not draw figures: %s", exc)
