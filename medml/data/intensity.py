"""The intensity registry: one MONAI intensity step per modality, as nnU-Net maps channel names
to normalisation schemes (CT: clip to a window and scale; MR: z-score over the body).

To add a modality: a factory ``(PreprocessConfig) -> MONAI dictionary transform on KEY`` and
one ``INTENSITY.register`` line; ``preprocess.modality`` then accepts its name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medml.extensions import Registry

if TYPE_CHECKING:
    from medml.config import PreprocessConfig

KEY = "image"


@dataclass(frozen=True)
class IntensitySpec:
    build: Callable[[PreprocessConfig], Any]
    doc: str = ""


INTENSITY: Registry[IntensitySpec] = Registry("modality")


def _ct_window(cfg: PreprocessConfig) -> Any:
    from monai import transforms as mt

    lo, hi = cfg.window
    return mt.ScaleIntensityRanged(KEY, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)


def _mr_zscore(cfg: PreprocessConfig) -> Any:
    from monai import transforms as mt

    return mt.NormalizeIntensityd(KEY, nonzero=True, channel_wise=True)


def _mask(cfg: PreprocessConfig) -> Any:
    from monai import transforms as mt

    return mt.ScaleIntensityd(KEY, minv=0.0, maxv=1.0)


INTENSITY.register("CT", IntensitySpec(_ct_window, "clip to preprocess.window (HU), scale to 0..1"))
INTENSITY.register("MR", IntensitySpec(_mr_zscore, "z-score over non-zero (body) voxels"))
INTENSITY.register("mask", IntensitySpec(_mask, "binary/label masks: plain 0..1 scaling"))
