"""The MONAI transform chain; the intensity step comes from the modality registry
(:mod:`medml.data.intensity`).

The deterministic part (load, orientation, spacing, intensity, crop, resize) is what the
persistent cache stores; anything random must come after it. Training (``load=True``) and
prediction (``load=False``) run this one chain, so a scan becomes the same tensor in both.

Spacing is MONAI's ``Spacingd`` computed lazily (MONAI's lazy resampling: the output grid and
the voxel-to-voxel affine, no voxels touched), then applied by :class:`SeparableSpacingd`: when
that affine is a pure per-axis scale and shift (every non-oblique volume after the RAS
reorientation), trilinear interpolation is separable, so three 1-D linear interpolations give
MONAI's result (to float32 rounding) at a fraction of the cost of its 3-D ``grid_sample``
(which costs more than the encoder's forward pass on CPU). Oblique volumes go through MONAI's
own resampling. Hand-written because MONAI has no separable executor for axis-aligned affines.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from monai.transforms.lazy.functional import apply_pending
from monai.transforms.lazy.utils import affine_from_pending
from monai.utils import LazyAttr

from medml.config import PreprocessConfig
from medml.data.intensity import INTENSITY, KEY

__all__ = ["KEY", "SeparableSpacingd", "deterministic_chain"]


class SeparableSpacingd(mt.MapTransform):
    """``Spacingd(keys, pixdim, mode="bilinear")`` with a separable executor (module doc)."""

    def __init__(self, keys: Any, pixdim: Any) -> None:
        super().__init__(keys)
        self.lazy_spacing = mt.Spacingd(keys, pixdim=pixdim, mode="bilinear", lazy=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = self.lazy_spacing(dict(data))
        for key in self.key_iterator(d):
            d[key] = _apply_spacing(d[key])
        return d


def _apply_spacing(img: MetaTensor) -> MetaTensor:
    pending = img.pending_operations[-1]
    matrix = np.asarray(affine_from_pending(pending), dtype=np.float64)  # out index -> in index
    linear = matrix[:3, :3]
    if len(img.pending_operations) != 1 or not np.allclose(linear, np.diag(np.diag(linear))):
        return apply_pending(img, overrides={"dtype": torch.float32})[0]  # oblique: MONAI's own
    shape = [int(n) for n in pending[LazyAttr.SHAPE]]
    src_affine = img.affine.double()
    # Work in memory order (a NIfTI volume is Fortran-ordered, the RAS reorientation permutes
    # and flips): the outermost axis first, where a gather copies whole blocks, so the strided
    # passes run on data already shrunk.
    x = img.as_tensor().float()
    dims = sorted(range(1, 4), key=lambda dim: -x.stride(dim))
    x = x.permute(0, *dims).contiguous()
    for pos, dim in enumerate(dims, start=1):
        axis = dim - 1
        n = x.shape[pos]
        # grid_sample's "border" padding clamps the coordinate to the volume
        coord = (
            (torch.arange(shape[axis], dtype=torch.float64) * matrix[axis, axis])
            .add_(matrix[axis, 3])
            .clamp_(0, n - 1)
        )
        lo = coord.floor().long()
        hi = (lo + 1).clamp_(max=n - 1)
        view = [1, 1, 1, 1]
        view[pos] = -1
        w = (coord - lo).float().view(view)
        x = torch.lerp(x.index_select(pos, lo), x.index_select(pos, hi), w)
    x = x.permute(0, *(1 + dims.index(d) for d in range(1, 4))).contiguous()
    dst_affine = src_affine @ torch.as_tensor(matrix, dtype=torch.float64)
    return MetaTensor(x, affine=dst_affine)


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
            SeparableSpacingd(KEY, pixdim=cfg.pixdim),
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
