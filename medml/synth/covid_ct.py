"""Chest-CT phantoms in Hounsfield units with COVID-19 severity classes CT-0..CT-4.

Classes follow MosMedData: the share of lung parenchyma involved is 0 (CT-0), under 25 %
(CT-1), 25-50 % (CT-2), 50-75 % (CT-3) and over 75 % (CT-4). Involvement is peripheral and
bilateral ground-glass opacity (-700..-300 HU), with consolidation (-100..+40 HU) in CT-3/CT-4.
Per-patient nuisances (body size, lung volume, position, rotation, noise, slice thickness, blur)
and a jitter on the involved share make adjacent classes overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medml.config import SynthConfig
from medml.synth.phantom import Grid, ellipsoid, rotate_xy, smooth_field, vessel_tree

CLASSES = ("CT-0", "CT-1", "CT-2", "CT-3", "CT-4")
SHARE_RANGES = ((0.0, 0.0), (0.03, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 0.95))

HU_AIR, HU_FAT, HU_SOFT, HU_LUNG = -1000.0, -100.0, 40.0, -860.0


@dataclass(frozen=True)
class ChestPatient:
    """Per-study nuisance and pathology parameters, drawn once from the seed."""

    label: int
    share: float
    body_scale: float
    lung_scale: float
    shift_xy: tuple[float, float]
    rotation_deg: float
    noise_hu: float
    blur_vox: float
    slice_thickness: float
    ggo_hu: float
    consolidation_frac: float

    @classmethod
    def draw(cls, label: int, cfg: SynthConfig, rng: np.random.Generator) -> ChestPatient:
        d = cfg.difficulty
        lo, hi = SHARE_RANGES[label]
        share = rng.uniform(lo, hi)
        if label > 0:  # jitter across class borders: ordinal classes overlap
            share = float(np.clip(share + rng.normal(0.0, 0.07 * d), 0.01, 0.97))
        return cls(
            label=label,
            share=share,
            body_scale=rng.uniform(1 - 0.15 * d, 1 + 0.1 * d),
            lung_scale=rng.uniform(1 - 0.15 * d, 1 + 0.08 * d),
            shift_xy=(rng.normal(0, 10 * d), rng.normal(0, 8 * d)),
            rotation_deg=rng.uniform(-8, 8) * d,
            noise_hu=rng.uniform(8, 8 + 40 * d),
            blur_vox=rng.uniform(0.3, 0.3 + 1.0 * d),
            slice_thickness=rng.uniform(*cfg.slice_thickness_mm),
            ggo_hu=rng.uniform(-700, -350),
            consolidation_frac=rng.uniform(0.2, 0.5) if label >= 3 else 0.0,
        )


def render_chest(
    p: ChestPatient, cfg: SynthConfig, rng: np.random.Generator
) -> tuple[np.ndarray, Grid]:
    """Render one study: HU volume indexed ``[slice, row, col]`` and its grid."""
    nz = max(8, int(round(cfg.z_extent_mm / p.slice_thickness)))
    grid = Grid.centred(cfg.matrix, cfg.fov_mm, nz, p.slice_thickness)
    z, y, x = grid.axes()
    x, y = rotate_xy(x - p.shift_xy[0], y - p.shift_xy[1], p.rotation_deg)
    z, y, x = np.broadcast_arrays(z, y, x)
    a, b = 150.0 * p.body_scale, 105.0 * p.body_scale  # body half-axes (L-R, A-P)

    body_r = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    vol = np.full(z.shape, HU_AIR, dtype=np.float32)
    vol[body_r <= 1.0] = HU_FAT
    vol[body_r <= 0.9] = HU_SOFT

    # Ribs: a band just inside the fat every ~25 mm along z, lateral and posterior.
    rib = (body_r > 0.8) & (body_r <= 0.86) & ((z % 25.0) < 9.0) & (y > -0.5 * b)
    vol[rib] = 650.0

    ls = p.lung_scale
    lung_radii = (0.42 * cfg.z_extent_mm * ls, 0.7 * b * ls, 0.34 * a * ls)
    lungs = []
    for side in (-1.0, 1.0):
        lungs.append(
            ellipsoid(z, y, x, (0.05 * cfg.z_extent_mm, 0.05 * b, side * 0.45 * a), lung_radii)
        )
    heart = ellipsoid(
        z, y, x, (-0.12 * cfg.z_extent_mm, -0.35 * b, 0.12 * a), (60.0, 0.32 * b, 0.3 * a)
    )
    lung = ((lungs[0] <= 1.0) | (lungs[1] <= 1.0)) & (heart > 1.0) & (np.abs(x) > 0.13 * a)
    vol[lung] = HU_LUNG

    # Vessels branch out from each hilum, within the lungs only.
    pts = np.stack([z[lung], y[lung], x[lung]], axis=1)
    vessels = np.zeros(len(pts), dtype=bool)
    for side in (-1.0, 1.0):
        root = np.array([0.0, 0.0, side * 0.22 * a])
        for _ in range(3):
            direction = np.array([rng.normal(0, 0.8), rng.normal(0, 0.5), side * 1.0])
            direction /= np.linalg.norm(direction)
            vessels |= vessel_tree(pts, root, direction, 0.18 * a, 4.0, 2, rng)

    lung_vals = np.full(len(pts), HU_LUNG, dtype=np.float32)
    lung_vals += 25.0 * smooth_field(z.shape, (1.0, 2.0, 2.0), rng)[lung]

    if p.share > 0:
        # Lesions: smooth random field biased to the lung periphery, thresholded to the share.
        sig = (12.0 / p.slice_thickness, 12.0 / grid.spacing[1], 12.0 / grid.spacing[2])
        field = smooth_field(z.shape, sig, rng)[lung]
        periphery = np.minimum(lungs[0], lungs[1])[lung]
        score = field + 2.0 * periphery
        cut = np.quantile(score, 1.0 - p.share)
        ggo = score > cut
        texture = 60.0 * smooth_field(z.shape, (1.0, 1.5, 1.5), rng)[lung]
        lung_vals[ggo] = p.ggo_hu + texture[ggo]
        if p.consolidation_frac > 0:
            dense = score > np.quantile(score, 1.0 - p.share * p.consolidation_frac)
            lung_vals[dense] = rng.uniform(-100, 40) + 0.5 * texture[dense]

    lung_vals[vessels] = HU_SOFT
    vol[lung] = lung_vals

    vol[heart <= 1.0] = 45.0
    # Spine: vertebral body with a cortical rim, and the canal behind it.
    spine_r = np.sqrt((x / (0.13 * b)) ** 2 + ((y - 0.62 * b) / (0.13 * b)) ** 2)
    vol[spine_r <= 1.0] = 700.0
    vol[spine_r <= 0.8] = 250.0
    canal = np.sqrt(x**2 + (y - 0.85 * b) ** 2) <= 0.05 * b
    vol[canal] = 20.0

    vol = ndimage.gaussian_filter(vol, (p.blur_vox * 0.5, p.blur_vox, p.blur_vox))
    vol += rng.normal(0.0, p.noise_hu, size=vol.shape).astype(np.float32)
    return np.clip(vol, -1024, 3071), grid
