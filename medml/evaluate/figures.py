"""Figures logged with each training run: embedding map, confusion matrix, retrieval examples."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402


def embedding_map(emb: np.ndarray, labels: Sequence[str], title: str, seed: int = 0) -> Figure:
    """t-SNE of embeddings, one colour per class."""
    labels = np.asarray(labels)
    perplexity = float(max(2, min(30, (len(emb) - 1) // 3)))
    xy = TSNE(
        n_components=2, perplexity=perplexity, init="pca", random_state=seed, metric="cosine"
    ).fit_transform(emb)
    fig, ax = plt.subplots(figsize=(6, 5))
    for c in sorted(set(labels.tolist())):
        ax.scatter(*xy[labels == c].T, s=18, label=c)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8, markerscale=1.2)
    fig.tight_layout()
    return fig


def confusion(
    truth: Sequence[str], pred: Sequence[str], classes: Sequence[str], title: str
) -> Figure:
    """Confusion matrix of nearest-centroid predictions (rows: truth)."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ConfusionMatrixDisplay.from_predictions(
        list(truth), list(pred), labels=list(classes), ax=ax, colorbar=False, cmap="Blues"
    )
    ax.set_title(title)
    fig.tight_layout()
    return fig


def retrieval_examples(
    images: np.ndarray, labels: Sequence[str], emb: np.ndarray, n_queries: int = 4, k: int = 5
) -> Figure:
    """Each row: a query's middle axial slice, then its k nearest neighbours (cosine)."""
    labels = np.asarray(labels)
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    queries = np.linspace(0, len(emb) - 1, min(n_queries, len(emb))).astype(int)
    k = min(k, len(emb) - 1)
    fig, axes = plt.subplots(
        len(queries), k + 1, figsize=(1.8 * (k + 1), 1.9 * len(queries)), squeeze=False
    )
    for row, q in enumerate(queries):
        order = np.argsort(-sims[q])[:k]
        for col, idx in enumerate([q, *order]):
            ax = axes[row, col]
            ax.imshow(images[idx].T, cmap="gray", origin="lower")
            ok = col == 0 or labels[idx] == labels[q]
            ax.set_title(
                ("query " if col == 0 else "") + str(labels[idx]),
                fontsize=7,
                color="black" if ok else "red",
            )
            ax.axis("off")
    fig.tight_layout()
    return fig
