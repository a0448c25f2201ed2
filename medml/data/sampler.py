"""Class-balanced batches: m scans per class (pytorch-metric-learning's MPerClassSampler)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from pytorch_metric_learning.samplers import MPerClassSampler


class EpochBalancedSampler(MPerClassSampler):
    """MPerClassSampler whose batches depend only on numpy's seed at the start of the epoch.

    PML's sampler shuffles its class list in place, so epoch k's batches also depend on every
    earlier epoch; restoring the list first makes a resumed run draw what an uninterrupted
    one would.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._class_order = list(self.labels)

    def __iter__(self) -> Iterator[int]:
        self.labels = list(self._class_order)
        return super().__iter__()


def balanced_sampler(
    labels: Sequence[int], m_per_class: int, batch_size: int, shards: int = 1
) -> EpochBalancedSampler:
    """``batch_size`` is rounded down to a multiple of ``m_per_class`` and capped by classes.

    With ``shards`` > 1 (distributed training) each rank's sampler yields 1/shards of an epoch.
    """
    n_classes = len(set(labels))
    batch = min(batch_size - batch_size % m_per_class, m_per_class * n_classes)
    length = max(len(labels) // shards, batch)
    return EpochBalancedSampler(
        list(labels), m=m_per_class, batch_size=batch, length_before_new_iter=length
    )
