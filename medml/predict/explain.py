"""Explain one prediction as a PNG a reader can check at a glance.

Top: the scan's middle axial, coronal and sagittal slices of the network input, in
radiological convention (the patient's right on the image's left) with L/R, A/P, S/I markers,
the saliency as a colour overlay with its colour bar, and a title with the input's name, the
predicted class, its probability, the runner-up, the margin and the open-set ("unknown")
state. Below: the nearest support scans with their classes and content ids.

Saliency (``predict.explain_method``): ``smoothgrad`` (default) is MONAI's ``SmoothGrad``, the
gradient of the similarity to the predicted prototype averaged over noisy copies: voxel-level,
at ``predict.explain_samples`` forward+backward passes. ``occlusion`` is MONAI's
``OcclusionSensitivity``: the drop in that similarity when a ``predict.explain_mask`` patch is
occluded, at about ``(2 * size / mask)^3`` forward passes, blockier but model-agnostic.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from medml.fewshot.prototypes import UNKNOWN
from medml.io import atomic_path
from medml.predict.output import umask_mode
from medml.predict.pyfunc import MedmlModel, prob_column, thumbnails

# (left, right, bottom, top) markers of the axial, coronal and sagittal views as displayed
MARKERS = (("R", "L", "P", "A"), ("R", "L", "I", "S"), ("A", "P", "I", "S"))
VIEWS = ("axial", "coronal", "sagittal")
NEAR_TIE = 0.05  # a margin below this is flagged in the title
OVERLAY_CMAP = "inferno"
OVERLAY_ALPHA = 0.75  # opacity of the strongest saliency; weaker saliency fades out linearly


class SimilarityHead(nn.Module):
    """``x -> cosine similarity of encoder(x) to each prototype``, shape ``(B, C)``."""

    def __init__(self, encoder: nn.Module, prototypes: np.ndarray) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("protos", torch.as_tensor(prototypes, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = nn.functional.normalize(self.encoder(x).float(), dim=1)
        return emb @ self.protos.T


def _head(model: MedmlModel) -> tuple[SimilarityHead, torch.device]:
    dev = next(model.encoder.parameters()).device
    return SimilarityHead(model.encoder, model.prototypes.vectors).eval().to(dev), dev


@torch.no_grad()
def occlusion_saliency(model: MedmlModel, volume: torch.Tensor, class_index: int) -> np.ndarray:
    """Drop in similarity to ``class_index`` when each region is occluded, ``(X, Y, Z)``."""
    from monai.visualize import OcclusionSensitivity

    head, dev = _head(model)
    x = volume[None].to(dev)
    occ = OcclusionSensitivity(
        head,
        mask_size=model.settings.predict.explain_mask,
        n_batch=model.settings.predict.batch_size,
        verbose=False,
        activate=False,
        overlap=0.5,  # half-patch stride: ~(2 * size / mask)^3 forward passes per scan
    )
    occ_map, _ = occ(x)
    base = head(x)[0, class_index]
    return (base - occ_map[0, class_index]).float().cpu().numpy()  # map: (B, N, X, Y, Z)


def gradient_saliency(model: MedmlModel, volume: torch.Tensor, class_index: int) -> np.ndarray:
    """MONAI SmoothGrad magnitude of the similarity to ``class_index``, ``(X, Y, Z)``; the
    noise is seeded, so the same scan gives the same map."""
    from monai.visualize import SmoothGrad

    head, dev = _head(model)
    grad = SmoothGrad(head, n_samples=model.settings.predict.explain_samples, verbose=False)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(0)
        sal = grad(volume[None].to(dev).float(), index=class_index)
    return sal[0, 0].detach().float().cpu().numpy()


def saliency(model: MedmlModel, volume: torch.Tensor, class_index: int) -> tuple[np.ndarray, str]:
    """The configured saliency map and the colour bar's label."""
    if model.settings.predict.explain_method == "occlusion":
        return occlusion_saliency(model, volume, class_index), "similarity drop when occluded"
    return gradient_saliency(model, volume, class_index), "|gradient| of similarity (SmoothGrad)"


def display_views(views: np.ndarray) -> list[np.ndarray]:
    """``thumbnails`` output (axial, coronal, sagittal of a RAS volume) as images to show with
    ``origin='lower'``: radiological convention, anterior to the left on the sagittal view."""
    return [views[j][::-1].T for j in range(3)]


def explanation_name(position: int, input_path: str) -> str:
    """``<position>_<input name>.png``: the position keeps names unique and in input order."""
    name = Path(str(input_path).rstrip("/\\")).name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:60] or "input"
    return f"{position:04d}_{safe}.png"


def _title(row: pd.Series, classes: list[str], position: int) -> str:
    probs = sorted(((float(row[prob_column(c)]), c) for c in classes), reverse=True)
    (p1, c1), (p2, c2) = probs[0], probs[1] if len(probs) > 1 else (float("nan"), "-")
    margin = float(row["margin"])
    state = "UNKNOWN (below the open-set threshold)" if row["predicted_class"] == UNKNOWN else ""
    tie = f"  near tie (margin < {NEAR_TIE})" if margin < NEAR_TIE else ""
    name = Path(str(row["input"]).rstrip("/\\")).name
    return (
        f"input {position}: {name}   scan {row['scan_id']}\n"
        f"predicted {row['predicted_class']}   p({c1}) = {p1:.3f}   runner-up p({c2}) = {p2:.3f}"
        f"   margin {margin:.3f}   similarity {float(row['similarity']):.3f}\n"
        f"{state}{tie}"
    ).rstrip()


def _overlay(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Saliency as an RGBA image whose opacity grows with the value, so the anatomy stays
    readable where the saliency is low."""
    import matplotlib

    level = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    rgba = matplotlib.colormaps[OVERLAY_CMAP](level)
    rgba[..., 3] = OVERLAY_ALPHA * level
    return rgba


def _markers(ax, view: int) -> None:
    left, right, bottom, top = MARKERS[view]
    style = {"color": "yellow", "fontsize": 11, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)


def write_explanation(
    model: MedmlModel,
    volume: torch.Tensor,
    row: pd.Series,
    neighbour_idx: list[int],
    position: int,
    out_dir: Path,
) -> Path:
    """``<out_dir>/<position>_<input name>.png`` for one predicted row (see module doc)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protos = model.prototypes
    volume = torch.as_tensor(volume)
    best = (
        protos.classes.index(row["predicted_class"])
        if row["predicted_class"] in protos.classes
        else None
    )
    if best is None:  # unknown: explain the nearest prototype
        best = int(np.argmax(protos.similarities(model.embed_volumes([volume]))[0]))
    sal, sal_label = saliency(model, volume, best)
    scan = display_views(thumbnails(volume).astype(np.float32))
    sal_views = display_views(thumbnails(torch.as_tensor(sal)[None]).astype(np.float32))
    # the colour range of what is shown (the three slices), robust to a few extreme voxels
    hi = float(np.percentile(np.abs(np.stack(sal_views)), 99.5)) or 1.0
    lo = -hi if sal.min() < 0 else 0.0

    n_nb = len(neighbour_idx)
    fig = plt.figure(figsize=(11, 4.6 + 1.9 * n_nb), dpi=110)
    grid = fig.add_gridspec(1 + n_nb, 4, height_ratios=[3.4] + [1.4] * n_nb,
                            width_ratios=[1, 1, 1, 0.06])  # fmt: skip
    for j in range(3):
        ax = fig.add_subplot(grid[0, j])
        ax.imshow(scan[j], cmap="gray", origin="lower", interpolation="bicubic")
        ax.imshow(_overlay(sal_views[j], lo, hi), origin="lower", interpolation="bicubic")
        _markers(ax, j)
        ax.set_title(VIEWS[j], fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    scale = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(lo, hi), OVERLAY_CMAP)
    bar = fig.colorbar(scale, cax=fig.add_subplot(grid[0, 3]))
    bar.set_label(f"{sal_label}, towards {protos.classes[best]}", fontsize=8)
    for r, idx in enumerate(neighbour_idx, start=1):
        views = (
            display_views(protos.thumbnails[idx].astype(np.float32))
            if protos.thumbnails is not None
            else None
        )
        for j in range(3):
            ax = fig.add_subplot(grid[r, j])
            if views is not None:
                ax.imshow(views[j], cmap="gray", origin="lower", interpolation="bicubic")
            else:
                ax.text(0.5, 0.5, "no thumbnail stored", ha="center", va="center", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(
                    f"support #{r}\n{protos.support_labels[idx]}\n{protos.support_ids[idx][:12]}",
                    fontsize=8,
                )
    fig.suptitle(_title(row, protos.classes, position), fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    out = Path(out_dir) / explanation_name(position, str(row["input"]))
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp)
        umask_mode(tmp)
    plt.close(fig)
    return out
