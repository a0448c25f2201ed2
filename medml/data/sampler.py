"""Class-balanced batches: m scans per class (pytorch-metric-learning's MPerClassSampler)."""

from __future__ import annotations

from collections.abc import Sequence

from pytorch_metric_learning.samplers import MPerClassSampler


def balanced_sampler(labels: Sequence[int], m_per_class: int, batch_size: int) -> MPerClassSampler:
    """``batch_size`` is rounded down to a multiple of ``m_per_class`` and capped by classes."""
    n_classes = len(set(labels))
    batch = min(batch_size - batch_size % m_per_class, m_per_class * n_classes)
    return MPerClassSampler(
        list(labels),
        m=m_per_class,
        batch_size=batch,
        length_before_new_iter=max(len(labels), batch),
    )
