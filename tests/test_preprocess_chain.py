"""One preprocessing chain for training and prediction; its direct path gives the results of
MONAI's own transforms (Orientation, Spacing, intensity, CropForeground, Resize)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medml.config import PreprocessConfig
from medml.data.transforms import KEY, Preprocessd, deterministic_chain
from medml.predict.loading import load_input


def test_training_and_prediction_preprocess_a_scan_to_the_same_tensor(ingested, tiny_settings):
    path = sorted(ingested.volumes.glob("*.nii.gz"))[0]
    cfg = tiny_settings.preprocess
    trained = deterministic_chain(cfg, load=True)({KEY: str(path)})[KEY]
    tensor, _ = load_input(path)
    predicted = deterministic_chain(cfg, load=False)({KEY: tensor})[KEY]
    assert trained.shape == predicted.shape == (1, *cfg.spatial_size)
    assert torch.allclose(torch.as_tensor(trained), torch.as_tensor(predicted), atol=1e-5)


def _volume(affine, dtype=torch.float32, shape=(40, 36, 20), seed=0) -> MetaTensor:
    rng = np.random.default_rng(seed)
    data = np.full((1, *shape), -1000.0)
    body = (slice(None), slice(5, -9), slice(3, -4), slice(2, -5))
    data[body] = rng.uniform(-1000, 400, data[body].shape)
    data = torch.as_tensor(data).to(dtype)  # a body in air: the crop has work to do
    return MetaTensor(data, affine=torch.as_tensor(affine, dtype=torch.float64))


AXIS_ALIGNED = [
    np.diag([3.75, 3.75, 5.0, 1.0]),  # RAS, finer than 6 mm: downsampled
    np.array([[7.0, 0, 0, -80], [0, 6.5, 0, 20], [0, 0, 9.0, -300], [0, 0, 0, 1]]),  # upsampled
    np.diag([-0.8, -0.75, 2.5, 1.0]),  # an LPS DICOM stack: x and y run backwards
    np.array([[0, 0, -4.0, 50], [3.0, 0, 0, -20], [0, -2.5, 0, 7], [0, 0, 0, 1]]),  # permuted
]


@pytest.mark.parametrize("modality", ["CT", "MR", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int16])
@pytest.mark.parametrize("affine", AXIS_ALIGNED)
def test_direct_path_gives_monai_steps_result(modality, dtype, affine):
    """The direct path of axis-aligned volumes is MONAI's Orientation/Spacing/intensity/
    CropForeground/Resize sequence, value for value (int16 input included: stored CT), for
    flipped and permuted stored axes too (read from the stored array, never reoriented)."""
    cfg = PreprocessConfig(modality=modality, window=(-1000, 400), spatial_size=(16, 16, 16),
                           foreground_threshold=0.3 if modality != "MR" else 0.0)  # fmt: skip
    step = Preprocessd(cfg)
    vol = _volume(affine, dtype)
    if modality == "mask":
        vol = MetaTensor((vol.as_tensor() > 0).to(dtype), affine=vol.affine)
    direct = step.direct(vol)
    assert direct is not None, "an axis-aligned volume must take the direct path"
    ref = step.monai_steps({KEY: vol})[KEY]
    assert direct.shape == ref.shape == (1, 16, 16, 16)
    assert type(direct) is torch.Tensor and direct.dtype == torch.float32
    assert float((direct - torch.as_tensor(ref)).abs().max()) < 1e-5


def test_oblique_multichannel_and_empty_volumes_take_monai_steps():
    cfg = PreprocessConfig(modality="CT", window=(-1000, 400), spatial_size=(16, 16, 16))
    step = Preprocessd(cfg)
    oblique = _volume(np.array([[3.0, 0.5, 0, 10], [0.2, 3.5, 0, -5], [0, 0, 5, 3], [0, 0, 0, 1]]))
    empty = _volume(np.diag([3.0, 3.0, 3.0, 1.0]))
    empty = MetaTensor(torch.full_like(empty.as_tensor(), -2000.0), affine=empty.affine)
    two = _volume(np.diag([3.0, 3.0, 3.0, 1.0]))
    two = MetaTensor(torch.cat([two.as_tensor()] * 2), affine=two.affine)
    for vol in (oblique, empty, two):
        assert step.direct(vol) is None
    out = step({KEY: oblique})[KEY]  # the chain still answers, by MONAI's steps
    assert out.shape == (1, 16, 16, 16)


@pytest.mark.parametrize("affine", AXIS_ALIGNED)
def test_voxel_hash_is_the_hash_of_the_canonical_volume(affine):
    """Prediction hashes the stored array slice by slice; the id is the one the reoriented
    (ingested) volume gets, and it tells different voxels apart."""
    from medml.ingest import nifti

    data = np.random.default_rng(1).integers(-1000, 400, (12, 10, 7)).astype(np.int32)
    canon = nifti.to_canonical(data, affine)  # int16 (compact), RAS, Fortran order
    ref = nifti.voxel_hash(np.asarray(canon.dataobj), canon.affine)
    assert nifti.voxel_hash(data, affine) == ref
    data[3, 4, 5] += 1
    assert nifti.voxel_hash(data, affine) != ref


def test_both_resampling_orders_give_the_same_values():
    """Gathering the needed voxels first (large volume, coarse grid) is the same arithmetic
    as interpolating axis by axis: equal to the last bit."""
    from medml.data.transforms import axis_plan, separable_resample

    x = torch.as_tensor(np.random.default_rng(3).integers(-1000, 400, (1, 90, 80, 70)))
    x = x.to(torch.int16)
    coarse = [axis_plan(6.3, 0.4, 14, 90), axis_plan(5.9, 0.2, 13, 80, True),
              axis_plan(4.7, 0.6, 15, 70)]  # fmt: skip
    gathered = math.prod(2 * p[0].numel() for p in coarse)
    assert 2 * gathered < x[0].numel()  # takes the gather-first branch
    one_by_one = x.float()
    for axis, (lo, hi, w) in enumerate(coarse, start=1):  # the plain definition
        view = [1, 1, 1, 1]
        view[axis] = -1
        one_by_one = torch.lerp(one_by_one.index_select(axis, lo),
                                one_by_one.index_select(axis, hi), w.view(view))  # fmt: skip
    ours = separable_resample(x, coarse)
    assert ours.shape == (1, 14, 13, 15)
    assert torch.equal(ours, one_by_one)
