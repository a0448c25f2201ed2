"""The MONAI transform chain; the intensity step comes from the modality registry
(:mod:`medml.data.intensity`).

The deterministic part (load, orientation, spacing, intensity, crop, resize) is what the
persistent cache stores; anything random must come after it.
"""

from __future__ import annotations

from monai import transforms as mt

from medml.config import PreprocessConfig
from medml.data.intensity import INTENSITY, KEY

__all__ = ["KEY", "deterministic_chain"]


def deterministic_chain(cfg: PreprocessConfig, load: bool = True) -> mt.Compose:
    """Bring a volume to a fixed-size, intensity-normalised tensor.

    With ``load`` the input is a NIfTI path; without, a channel-first MetaTensor with its affine.
    """
    intensity = INTENSITY[cfg.modality].build(cfg)
    loader = [mt.LoadImaged(KEY, image_only=True, ensure_channel_first=True)] if load else []
    return mt.Compose(
        [
            *loader,
            mt.Orientationd(KEY, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            mt.Spacingd(KEY, pixdim=cfg.pixdim, mode="bilinear"),
            intensity,
            mt.CropForegroundd(
                KEY,
                source_key=KEY,
                allow_smaller=True,
                select_fn=lambda x: x > cfg.foreground_threshold,
                start_coord_key=None,
                end_coord_key=None,
            ),
            mt.Resized(KEY, spatial_size=cfg.spatial_size, mode="trilinear"),
            mt.EnsureTyped(KEY, track_meta=False),
        ]
    )
