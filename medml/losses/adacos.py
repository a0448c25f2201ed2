"""AdaCos (Zhang et al., CVPR 2019): a cosine softmax whose scale needs no tuning.

pytorch-metric-learning has no AdaCos, so it is written here. Logits are ``s * cos(theta)``
with no added margin.

- fixed:   s = sqrt(2) * ln(C - 1)
- dynamic: s is recomputed every batch, without gradient, from the previous s:
  ``B_avg = mean_i sum_{j != y_i} exp(s_prev * cos theta_ij)`` and
  ``theta_med = median_i theta_{i, y_i}``, then ``s = ln(B_avg) / cos(min(pi/4, theta_med))``.

The paper's derivation assumes many classes. For C <= 3 its fixed scale is <= 1 (0 for two
classes), and with one non-target class ``ln(B_avg)`` is about ``s_prev * cos`` of that class,
so the dynamic update shrinks s towards 0, where it stays (the loss sits at ln 2; measured on
AdrenalMNIST3D). For C <= 3 only, therefore, ``C - 1`` is clamped at 2 for the scale and the
dynamic scale never falls below that value: the one deviation from the paper, so binary and
three-class tasks train. From four classes on, both formulas are the paper's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def fixed_scale(n_classes: int) -> float:
    """The paper's fixed scale, sqrt(2) ln(C - 1), with C - 1 clamped at 2 (see module doc)."""
    return math.sqrt(2.0) * math.log(max(n_classes - 1, 2))


@torch.no_grad()
def dynamic_scale(cos: torch.Tensor, labels: torch.Tensor, s_prev: float) -> float:
    """One dynamic update of the scale from a batch of cosines ``(B, C)`` and labels ``(B,)``."""
    target = F.one_hot(labels, cos.shape[1]).bool()
    b_avg = torch.where(target, torch.zeros_like(cos), torch.exp(s_prev * cos)).sum(dim=1).mean()
    theta = torch.acos(cos[target].clamp(-1.0 + 1e-7, 1.0 - 1e-7))
    theta_med = torch.median(theta)  # lower median for even B, as torch.median defines it
    return float(torch.log(b_avg) / torch.cos(torch.clamp(theta_med, max=math.pi / 4)))


class AdaCosLoss(nn.Module):
    """Cross-entropy over ``s * cos`` to learnable class centres ``W`` (C x E)."""

    def __init__(self, num_classes: int, embedding_size: int, dynamic: bool = True) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.xavier_uniform_(self.W)
        self.dynamic = dynamic
        self.register_buffer("s", torch.tensor(fixed_scale(num_classes)))
        self.min_scale = fixed_scale(num_classes) if num_classes <= 3 else 0.0  # see module doc

    def cosines(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.normalize(embeddings, dim=1) @ F.normalize(self.W, dim=1).T

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosines(embeddings)
        if self.dynamic and self.training:
            s = dynamic_scale(cos.float(), labels, float(self.s))
            self.s.fill_(max(s, self.min_scale))
        return F.cross_entropy(self.s * cos, labels)
