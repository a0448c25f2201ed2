"""The baseline every metric-learning loss is compared with: a linear classifier + cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SoftmaxLoss(nn.Module):
    """Plain softmax cross-entropy on a linear layer over the embedding."""

    def __init__(self, num_classes: int, embedding_size: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(embedding_size, num_classes)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.classifier(embeddings), labels)
