"""Chest-CT phantoms in Hounsfield units with COVID-19 severity classes CT-0..CT-4.

Classes follow MosMedData: the share of lung parenchyma involved is 0 (CT-0), under 25 %
(CT-1), 25-50 % (CT-2), 50-75 % (CT-3) and over 75 % (CT-4). Involvement is peripheral and
bilateral ground-glass opacity (-700..-300 HU), with consolidation (-100..+40 HU) in CT-3/CT-4.
Per-patient nuisances (body size, lung volume, position, rotation, noise, slice thickness, blur)
and a jitter on the involved share make adjacent classes overlap.

Novel findings (``--novel``, for few-shot evaluation; never in the base training classes) are
drawn on otherwise clear lungs: emphysema (upper-zone low-attenuation areas and apical bullae),
pleural effusion (dependent fluid layer), a solitary pulmonary nodule, fibrosis with
honeycombing (peripheral basal reticulation with clustered air cysts and volume loss), and lobar
consolidation (bacterial pneumonia: part or all of one lobe, one side, at soft-tissue density
with air bronchograms, bounded by the oblique fissure).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medml.config import SynthConfig
from medml.synth.phantom import (
    Grid,
    draw_tubes,
    ellipsoid,
    rotate_xy,
    smooth_field,
    vessel_segments,
)

CLASSES = ("CT-0", "CT-1", "CT-2", "CT-3", "CT-4")
NOVEL_CLASSES = (
    "emphysema",
    "pleural-effusion",
    "solitary-nodule",
    "honeycombing",
    "lobar-consolidation",
)
ALL_CLASSES = CLASSES + NOVEL_CLASSES
MODALITY = "CT"
ORDINAL = True
SHARE_RANGES = ((0.0, 0.0), (0.03, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 0.95))

HU_AIR, HU_FAT, HU_SOFT, HU_LUNG = -1000.0, -100.0, 40.0, -860.0


@dataclass(frozen=True)
class ChestPatient:
    """Per-study nuisance and pathology parameters, drawn once from the seed."""

    label: int  # index into ALL_CLASSES
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
    severity: float = 0.0  # novel findings: extent in 0..1

    @property
    def finding(self) -> str | None:
        return ALL_CLASSES[self.label] if self.label >= len(CLASSES) else None

    @classmethod
    def draw(cls, label: int, cfg: SynthConfig, rng: np.random.Generator) -> ChestPatient:
        n = cfg.difficulty * cfg.nuisance  # nuisance scale
        o = cfg.difficulty * cfg.overlap  # how far shares stray across class borders
        lo, hi = SHARE_RANGES[label] if label < len(CLASSES) else (0.0, 0.0)
        share = rng.uniform(lo, hi)
        if 0 < label < len(CLASSES):  # jitter across class borders: ordinal classes overlap
            share = float(np.clip(share + rng.normal(0.0, 0.07 * o), 0.01, 0.97))
        return cls(
            label=label,
            share=share,
            body_scale=rng.uniform(1 - 0.15 * n, 1 + 0.1 * n),
            lung_scale=rng.uniform(1 - 0.15 * n, 1 + 0.08 * n),
            shift_xy=(rng.normal(0, 10 * n), rng.normal(0, 8 * n)),
            rotation_deg=rng.uniform(-8, 8) * n,
            noise_hu=rng.uniform(8, 8 + 40 * n),
            blur_vox=rng.uniform(0.3, 0.3 + 1.0 * n),
            slice_thickness=rng.uniform(*cfg.slice_thickness_mm),
            ggo_hu=rng.uniform(-700, -350),
            consolidation_frac=rng.uniform(0.2, 0.5) if label in (3, 4) else 0.0,
            severity=rng.uniform(0.4, 1.0),
        )


def draw(label: int, cfg: SynthConfig, rng: np.random.Generator) -> ChestPatient:
    """Generator interface: the parameters of one study of class ``ALL_CLASSES[label]``."""
    return ChestPatient.draw(label, cfg, rng)


def render(p: ChestPatient, cfg: SynthConfig, rng: np.random.Generator) -> tuple[np.ndarray, Grid]:
    """Generator interface: see :func:`render_chest`."""
    return render_chest(p, cfg, rng)


def _to_index(grid: Grid, p: ChestPatient) -> np.ndarray:
    """Homogeneous map from patient-frame (z, y, x) mm to (slice, row, col) indices."""
    t = np.deg2rad(-p.rotation_deg)  # grid = R(-theta) patient + shift
    c, s = np.cos(t), np.sin(t)
    patient_to_grid = np.array(
        [
            [1, 0, 0, 0],
            [0, c, s, p.shift_xy[1]],  # y = sin*x' + cos*y'
            [0, -s, c, p.shift_xy[0]],  # x = cos*x' - sin*y'
            [0, 0, 0, 1],
        ],
        dtype=float,
    )
    grid_to_index = np.diag([1 / grid.spacing[0], 1 / grid.spacing[1], 1 / grid.spacing[2], 1.0])
    grid_to_index[:3, 3] = -np.array(grid.origin) / np.array(grid.spacing)
    return grid_to_index @ patient_to_grid


def render_chest(
    p: ChestPatient, cfg: SynthConfig, rng: np.random.Generator
) -> tuple[np.ndarray, Grid]:
    """Render one study: HU volume indexed ``[slice, row, col]`` and its grid."""
    nz = max(8, int(round(cfg.z_extent_mm / p.slice_thickness)))
    grid = Grid.centred(cfg.matrix, cfg.fov_mm, nz, p.slice_thickness)
    shape = grid.shape
    z, y, x = grid.axes()
    x, y = rotate_xy(x - p.shift_xy[0], y - p.shift_xy[1], p.rotation_deg)  # patient frame
    a, b = 150.0 * p.body_scale, 105.0 * p.body_scale  # body half-axes (L-R, A-P)

    body_r2 = (x / a) ** 2 + (y / b) ** 2  # 2-D: the body is a cylinder along z
    plane = np.where(body_r2 <= 0.81, HU_SOFT, np.where(body_r2 <= 1.0, HU_FAT, HU_AIR))
    vol = np.broadcast_to(plane, shape).astype(np.float32)

    # Ribs: a band just inside the fat every ~25 mm along z, lateral and posterior.
    ring = (body_r2 > 0.64) & (body_r2 <= 0.86**2) & (y > -0.5 * b)
    vol[((z % 25.0) < 9.0) & ring] = 650.0

    ls = p.lung_scale * (0.85 if p.finding == "honeycombing" else 1.0)  # fibrosis shrinks
    lung_radii = (0.42 * cfg.z_extent_mm * ls, 0.7 * b * ls, 0.34 * a * ls)
    lungs = [
        ellipsoid(z, y, x, (0.05 * cfg.z_extent_mm, 0.05 * b, side * 0.45 * a), lung_radii)
        for side in (-1.0, 1.0)
    ]
    heart = ellipsoid(
        z, y, x, (-0.12 * cfg.z_extent_mm, -0.35 * b, 0.12 * a), (60.0, 0.32 * b, 0.3 * a)
    )
    lung = ((lungs[0] <= 1.0) | (lungs[1] <= 1.0)) & (heart > 1.0) & (np.abs(x) > 0.13 * a)

    # Vessels branch out from each hilum; only their bounding boxes are ever evaluated.
    segments = []
    for side in (-1.0, 1.0):
        root = np.array([0.0, 0.0, side * 0.22 * a])
        for _ in range(3):
            direction = np.array([rng.normal(0, 0.8), rng.normal(0, 0.5), side * 1.0])
            direction /= np.linalg.norm(direction)
            segments += vessel_segments(root, direction, 0.18 * a, 4.0, 2, rng)
    vessels = draw_tubes(shape, _to_index(grid, p), (z, y, x), segments)

    # One fine texture field serves the normal parenchyma and the lesions' inner texture.
    texture = smooth_field(shape, (1.0, 1.5, 1.5), rng)
    tex = texture[lung]
    lung_vals = np.float32(HU_LUNG) + 25.0 * tex
    periphery = np.minimum(lungs[0], lungs[1])[lung]

    if p.share > 0:
        # Lesions: smooth random field biased to the lung periphery, thresholded to the share.
        sig = (12.0 / p.slice_thickness, 12.0 / grid.spacing[1], 12.0 / grid.spacing[2])
        score = smooth_field(shape, sig, rng)[lung] + 2.0 * periphery
        cut = np.quantile(score, 1.0 - p.share)
        ggo = score > cut
        lung_vals[ggo] = p.ggo_hu + 60.0 * tex[ggo]
        if p.consolidation_frac > 0:
            dense = score > np.quantile(score, 1.0 - p.share * p.consolidation_frac)
            lung_vals[dense] = rng.uniform(-100, 40) + 30.0 * tex[dense]

    lung_vals[vessels[lung]] = HU_SOFT
    if p.finding:
        _novel_finding(p, grid, (z, y, x), lung, lungs, periphery, lung_vals, lung_radii, b, rng)
    vol[lung] = lung_vals
    if p.finding == "pleural-effusion":
        _effusion(p, (z, y, x), lungs, heart, vol, b, lung_radii)

    vol[np.broadcast_to(heart <= 1.0, shape)] = 45.0
    # Spine: vertebral body with a cortical rim, and the canal behind it (2-D, along z).
    spine_r = np.sqrt((x / (0.13 * b)) ** 2 + ((y - 0.62 * b) / (0.13 * b)) ** 2)
    canal = np.sqrt(x**2 + (y - 0.85 * b) ** 2) <= 0.05 * b
    vol[:, spine_r[0] <= 1.0] = 700.0
    vol[:, spine_r[0] <= 0.8] = 250.0
    vol[:, canal[0]] = 20.0

    vol = ndimage.gaussian_filter(vol, (p.blur_vox * 0.5, p.blur_vox, p.blur_vox), truncate=3.0)
    vol += rng.standard_normal(shape, dtype=np.float32) * np.float32(p.noise_hu)
    return np.clip(vol, -1024, 3071), grid


def _novel_finding(p, grid, zyx, lung, lungs, periphery, lung_vals, lung_radii, b, rng) -> None:
    """Paint a novel finding into ``lung_vals`` (the lung voxels' HU, in place)."""
    z, y, x = (np.broadcast_to(c, grid.shape)[lung] for c in zyx)
    zc = (z - z.min()) / max(float(np.ptp(z)), 1.0)  # 0 at the base, 1 at the apex
    if p.finding == "emphysema":
        # Low-attenuation areas, upper zones first, and a few apical bullae.
        sig = tuple(8.0 / s for s in grid.spacing)
        score = smooth_field(grid.shape, sig, rng)[lung] + 2.5 * zc
        lung_vals[score > np.quantile(score, 1.0 - 0.15 - 0.25 * p.severity)] = -975.0
        for _ in range(rng.integers(1, 4)):
            i = rng.choice(np.flatnonzero(zc > 0.6))
            r = rng.uniform(10, 22)
            d = np.sqrt((z - z[i]) ** 2 + (y - y[i]) ** 2 + (x - x[i]) ** 2)
            lung_vals[(d <= r) & (d > r - 2)] = -300.0  # thin wall
            lung_vals[d <= r - 2] = -995.0
    elif p.finding == "solitary-nodule":
        i = rng.choice(np.flatnonzero(periphery < 0.8))
        r = 8.0 + 10.0 * p.severity
        d = np.sqrt((z - z[i]) ** 2 + (y - y[i]) ** 2 + (x - x[i]) ** 2)
        lobulated = r * (1 + 0.15 * rng.standard_normal(d.shape).clip(-1, 1))
        lung_vals[d <= lobulated] = rng.uniform(10, 50)
    elif p.finding == "honeycombing":
        # Peripheral, basal fibrosis: reticulation with clustered air cysts and thick walls.
        zone = (periphery > 0.75 - 0.2 * p.severity) & (zc < 0.55 + 0.2 * p.severity)
        cells = smooth_field(grid.shape, (0.8, 0.8, 0.8), rng)[lung]
        vals = np.where(cells > 0.6, -950.0, np.where(cells > -0.2, -80.0, -550.0))
        lung_vals[zone] = vals[zone].astype(np.float32)
    elif p.finding == "lobar-consolidation":
        _consolidation(p, grid, zyx, lung, (z, y, x), zc, lung_vals, b / 0.7, rng)


def _consolidation(p, grid, zyx, lung, lung_zyx, zc, lung_vals, a, rng) -> None:
    """Lobar pneumonia in one lung: the upper or lower lobe (split by an oblique fissure that
    runs from high posterior to low anterior), filled from the fissure-far side for 40-100 % of
    the lobe with severity, at -40..+40 HU; the bronchi inside stay air (air bronchograms)."""
    z, y, x = lung_zyx
    side = rng.choice((-1.0, 1.0))
    yn = (y - y.min()) / max(float(np.ptp(y)), 1.0)  # 0 anterior, 1 posterior
    fissure = zc - (0.15 + 0.7 * yn)  # < 0: lower lobe (posterior-basal), > 0: upper lobe
    lower = bool(rng.random() < 0.6)  # lower-lobe pneumonia is the more common
    depth = -fissure if lower else fissure
    lobe = (x * side > 0) & (depth > 0)
    if not lobe.any():
        return
    # Spread from the lobe's far side towards the fissure with an irregular, patchy front;
    # only a whole-lobe consolidation shows the fissure's straight edge.
    sig = tuple(12.0 / s for s in grid.spacing)
    score = depth + 0.3 * smooth_field(grid.shape, sig, rng)[lung]
    cut = np.quantile(score[lobe], 1.0 - (0.4 + 0.6 * p.severity))
    dense = lobe & (score > cut)
    hu = rng.uniform(-40.0, 40.0)
    lung_vals[dense] = hu + 15.0 * smooth_field(grid.shape, (1.0, 1.5, 1.5), rng)[lung][dense]
    # Air bronchograms (the sign of consolidation): a bronchial tree from the hilum, lobar
    # bronchi ~9 mm wide, visible only where the lung around them is dense.
    root = np.array([0.0, 0.0, side * 0.22 * a])
    segments = []
    for _ in range(3):
        direction = np.array([rng.normal(-0.6 if lower else 0.6, 0.4), rng.normal(0, 0.5), side])
        direction /= np.linalg.norm(direction)
        segments += vessel_segments(root, direction, 0.2 * a, 4.5, 3, rng)
    bronchi = draw_tubes(grid.shape, _to_index(grid, p), zyx, segments)[lung]
    lung_vals[dense & bronchi] = -900.0


def _effusion(p, zyx, lungs, heart, vol, b, lung_radii) -> None:
    """Dependent pleural fluid: the posterior, lower part of one or both pleural spaces."""
    z, y, x = zyx
    depth = (0.12 + 0.3 * p.severity) * 2 * lung_radii[1]  # fluid height, posterior -> anterior
    top = (0.05 * b + lung_radii[1]) - depth + 0.3 * (z - z.mean())  # more at the base
    sides = (0, 1) if p.severity > 0.6 else (int(p.severity * 1e4) % 2,)
    for side in sides:
        fluid = (lungs[side] <= 1.0) & (y > top) & (heart > 1.0)
        vol[fluid] = 12.0
