"""Training-time augmentation: random MONAI transforms applied after the cached chain.

Randomness is reseeded per epoch from (seed, epoch), so an interrupted run resumed at epoch k
sees exactly the augmentations an uninterrupted run would have.
"""

from __future__ import annotations

import math
from typing import Any

from monai import transforms as mt
from torch.utils.data import Dataset

from medml.config import AugmentConfig
from medml.data.transforms import KEY


def augment_chain(cfg: AugmentConfig) -> mt.Compose:
    """RandAffined, RandFlipd (left-right), RandGaussianNoised and intensity shift/scale."""
    rad = math.radians(cfg.rotate_deg)
    chain: list[mt.MapTransform] = [
        mt.RandAffined(
            KEY,
            prob=cfg.prob,
            rotate_range=(rad, rad, rad),
            scale_range=(cfg.scale,) * 3,
            padding_mode="border",
            mode="bilinear",
        ),
    ]
    if cfg.flip_lr:
        chain.append(mt.RandFlipd(KEY, prob=0.5, spatial_axis=0))  # RAS axis 0 is left-right
    chain += [
        mt.RandGaussianNoised(KEY, prob=cfg.prob, std=cfg.noise_std),
        mt.RandShiftIntensityd(KEY, offsets=cfg.intensity_shift, prob=cfg.prob),
        mt.RandScaleIntensityd(KEY, factors=cfg.intensity_shift, prob=cfg.prob),
        mt.EnsureTyped(KEY, track_meta=False),
    ]
    return mt.Compose(chain)


class Augmented(Dataset):
    """Applies ``augment_chain`` on top of a dataset of dicts; ``set_epoch`` reseeds it."""

    def __init__(self, base: Dataset, cfg: AugmentConfig) -> None:
        self.base = base
        self.transform = augment_chain(cfg) if cfg.enabled else None

    def set_epoch(self, seed: int) -> None:
        if self.transform is not None:
            self.transform.set_random_state(seed=seed)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[i]
        if self.transform is None:
            return item
        return {**item, KEY: self.transform({KEY: item[KEY]})[KEY]}
