"""MONAI transform chains per modality.

The deterministic part (load, orientation, spacing, intensity, crop, resize) is what the
persistent cache stores; anything random must come after it.
"""

from __future__ import annotations

from monai import transforms as mt

from medml.config import PreprocessConfig

KEY = "image"


def deterministic_chain(cfg: PreprocessConfig, load: bool = True) -> mt.Compose:
    """Bring a volume to a fixed-size, intensity-normalised tensor.

    With ``load`` the input is a NIfTI path; without, a channel-first MetaTensor with its affine.
    """
    if cfg.modality == "CT":
        intensity = mt.ScaleIntensityRanged(
            KEY, a_min=cfg.window[0], a_max=cfg.window[1], b_min=0.0, b_max=1.0, clip=True
        )
    elif cfg.modality == "mask":  # binary/label masks (e.g. AdrenalMNIST3D's 0/255 shapes)
        intensity = mt.ScaleIntensityd(KEY, minv=0.0, maxv=1.0)
    else:
        intensity = mt.NormalizeIntensityd(KEY, nonzero=True, channel_wise=True)
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
