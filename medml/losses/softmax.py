"""The baseline every metric-learning loss is compared with: a linear classifier + cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SoftmaxLoss(nn.Module):
    """Plain softmax cross-entropy on a linear layer over the embedding.

    ``label_smoothing`` (``loss.options``, torch's meaning: that share of the target spread
    over every class) keeps the classifier from driving training scans to certainty.
    """

    def __init__(self, num_classes: int, embedding_size: int, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.classifier = nn.Linear(embedding_size, num_classes)
        self.label_smoothing = float(label_smoothing)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            self.classifier(embeddings), labels, label_smoothing=self.label_smoothing
        )
