"""One preprocessing chain for training and prediction; its fast spacing step gives MONAI's
own ``Spacingd`` result."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from medml.data.transforms import KEY, SeparableSpacingd, deterministic_chain
from medml.predict.loading import load_input


@pytest.mark.parametrize(
    "affine",
    [
        np.diag([3.75, 3.75, 5.0, 1.0]),  # axis-aligned: the separable path
        np.diag([-0.8, -0.8, 2.5, 1.0]),  # LPS-like: flipped by the RAS reorientation first
        np.array([[3.0, 0.5, 0, 10], [0.2, 3.5, 0, -5], [0, 0, 5, 3], [0, 0, 0, 1]]),  # oblique
    ],
)
def test_separable_spacing_matches_monai_spacing(affine):
    rng = np.random.default_rng(0)
    vol = MetaTensor(torch.as_tensor(rng.uniform(-1000, 400, (1, 40, 36, 20)), dtype=torch.float32),
                     affine=torch.as_tensor(affine))  # fmt: skip
    data = mt.Orientationd(KEY, axcodes="RAS")({KEY: vol})
    ours = SeparableSpacingd(KEY, pixdim=(6.0, 6.0, 6.0))(dict(data))[KEY]
    ref = mt.Spacingd(KEY, pixdim=(6.0, 6.0, 6.0), mode="bilinear")(dict(data))[KEY]
    assert ours.shape == ref.shape
    assert torch.allclose(ours.affine.double(), ref.affine.double(), atol=1e-6)
    assert float((ours.as_tensor() - ref.as_tensor()).abs().max()) < 1e-2  # of a 1400 HU range


def test_training_and_prediction_preprocess_a_scan_to_the_same_tensor(ingested, tiny_settings):
    path = sorted(ingested.volumes.glob("*.nii.gz"))[0]
    cfg = tiny_settings.preprocess
    trained = deterministic_chain(cfg, load=True)({KEY: str(path)})[KEY]
    tensor, _ = load_input(path)
    predicted = deterministic_chain(cfg, load=False)({KEY: tensor})[KEY]
    assert trained.shape == predicted.shape == (1, *cfg.spatial_size)
    assert torch.allclose(torch.as_tensor(trained), torch.as_tensor(predicted), atol=1e-5)
