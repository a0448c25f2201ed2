"""Explain one prediction: middle slices, an occlusion saliency map, the nearest support scans.

Saliency is MONAI's occlusion sensitivity on a small head that turns the encoder into a
"classifier" whose outputs are the cosine similarities to each prototype; a voxel matters when
occluding it lowers the similarity to the predicted class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.visualize import OcclusionSensitivity
from torch import nn

from medml.io import atomic_path
from medml.predict.pyfunc import MedmlModel, thumbnails


class SimilarityHead(nn.Module):
    """``x -> cosine similarity of encoder(x) to each prototype``, shape ``(B, C)``."""

    def __init__(self, encoder: nn.Module, prototypes: np.ndarray) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("protos", torch.as_tensor(prototypes, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = nn.functional.normalize(self.encoder(x).float(), dim=1)
        return emb @ self.protos.T


@torch.no_grad()
def occlusion_saliency(model: MedmlModel, volume: torch.Tensor, class_index: int) -> np.ndarray:
    """Drop in similarity to ``class_index`` when each region is occluded, ``(X, Y, Z)``."""
    head = SimilarityHead(model.encoder, model.prototypes.vectors).eval()
    dev = next(model.encoder.parameters()).device
    head = head.to(dev)
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


def write_explanation(
    model: MedmlModel,
    volume: torch.Tensor,
    scan_id: str,
    predicted: str,
    neighbour_idx: list[int],
    out_dir: Path,
) -> Path:
    """``<out_dir>/<scan_id>.png``: slices + saliency of the scan, then its nearest support."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protos = model.prototypes
    sims = protos.similarities(model.embed_volumes([volume]))[0]
    cls = int(np.argmax(sims))
    sal = occlusion_saliency(model, volume, cls)
    scan = thumbnails(volume).astype(np.float32)
    sal_slices = thumbnails(torch.as_tensor(sal)[None]).astype(np.float32)
    n_nb = len(neighbour_idx)
    fig, axes = plt.subplots(2 + n_nb, 3, figsize=(7.5, 2.5 * (2 + n_nb)), squeeze=False)
    views = ("axial", "coronal", "sagittal")
    for j in range(3):
        axes[0, j].imshow(scan[j].T, cmap="gray", origin="lower")
        axes[0, j].set_title(f"{views[j]}", fontsize=8)
        axes[1, j].imshow(scan[j].T, cmap="gray", origin="lower")
        axes[1, j].imshow(sal_slices[j].T, cmap="hot", alpha=0.5, origin="lower")
    axes[0, 0].set_ylabel(f"scan {scan_id[:8]}\n-> {predicted}", fontsize=8)
    axes[1, 0].set_ylabel(f"occlusion saliency\n({protos.classes[cls]})", fontsize=8)
    for r, idx in enumerate(neighbour_idx, start=2):
        label = f"support {protos.support_ids[idx][:8]}\n{protos.support_labels[idx]}"
        for j in range(3):
            ax = axes[r, j]
            if protos.thumbnails is not None:
                ax.imshow(
                    protos.thumbnails[idx, j].astype(np.float32).T, cmap="gray", origin="lower"
                )
            else:
                ax.text(0.5, 0.5, "no thumbnail stored", ha="center", va="center", fontsize=7)
        axes[r, 0].set_ylabel(label, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out = Path(out_dir) / f"{scan_id}.png"
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return out
