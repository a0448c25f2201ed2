"""Abdominal MRI phantoms (T1- or T2-weighted style, arbitrary units) with fibrosis stages F0..F4.

Stage effects grow with a continuous stage ``s`` (the class plus a jitter that crosses class
borders, so adjacent stages are confusable): liver surface nodularity; parenchymal
heterogeneity (regenerative nodules and a reticular network of fibrous septa, bright on T2 and
dark on T1); a shrinking right lobe with a growing caudate lobe (caudate-to-right-lobe ratio);
splenomegaly; ascites around the liver at F4.

MRI nuisances: a smooth multiplicative bias field, Rician noise, a scanner-dependent intensity
scale, varying pixel spacing and slice thickness, patient pose, and acquisitions in axial,
coronal or oblique planes.

Novel findings (``--novel``) on an F0 liver: steatosis (brighter, enlarged liver), hepatic cysts
(fluid-filled, sharply marginated) and iron overload (dark liver, and spleen when transfusional).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medml.config import SynthConfig
from medml.synth.phantom import (
    AXIAL,
    CORONAL,
    Grid,
    ellipsoid_in,
    rician,
    rotate_xy,
    smooth_field,
    upsample,
)

CLASSES = ("F0", "F1", "F2", "F3", "F4")
NOVEL_CLASSES = ("steatosis", "hepatic-cyst", "iron-overload")
ALL_CLASSES = CLASSES + NOVEL_CLASSES
MODALITY = "MR"
ORDINAL = True

# Relative signal of each tissue (fat = 1 on T1): what makes a T1 or a T2 image look like one.
TISSUE = {
    "T1": {
        "fat": 1.0, "liver": 0.62, "spleen": 0.45, "kidney": 0.5, "muscle": 0.36,
        "fluid": 0.12, "marrow": 0.72, "vessel": 0.05, "bowel": 0.5,
        "septa": -0.25, "nodule": 0.06,
    },
    "T2": {
        "fat": 0.75, "liver": 0.3, "spleen": 0.62, "kidney": 0.58, "muscle": 0.22,
        "fluid": 1.5, "marrow": 0.45, "vessel": 0.04, "bowel": 0.45,
        "septa": 0.45, "nodule": -0.08,
    },
}  # fmt: skip


@dataclass(frozen=True)
class AbdomenPatient:
    """Per-study parameters, drawn once from the seed."""

    label: int  # index into ALL_CLASSES
    stage: float  # continuous fibrosis stage 0..4 (class + jitter)
    weighting: str
    plane: str  # axial, coronal or oblique
    iop: tuple[float, float, float, float, float, float]
    body_scale: float
    liver_scale: float
    shift: tuple[float, float, float]  # patient shift (z, y, x) mm
    rotation_deg: float
    fov_mm: float
    slice_thickness: float
    scanner_scale: float
    bias: float
    noise: float
    blur_vox: float
    severity: float  # novel findings: extent 0..1

    @property
    def finding(self) -> str | None:
        return ALL_CLASSES[self.label] if self.label >= len(CLASSES) else None


def _oblique_iop(rng: np.random.Generator, lo: float, hi: float) -> tuple[float, ...]:
    """Axial orientation tilted about the L-R axis by lo..hi degrees and a little about A-P."""
    a = np.deg2rad(rng.uniform(lo, hi) * rng.choice([-1.0, 1.0]))
    b = np.deg2rad(rng.uniform(-0.5, 0.5) * lo)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    r = ry @ rx
    return tuple(float(v) for v in np.concatenate([r @ [1, 0, 0], r @ [0, 1, 0]]))


def draw(label: int, cfg: SynthConfig, rng: np.random.Generator) -> AbdomenPatient:
    """Generator interface: the parameters of one study of class ``ALL_CLASSES[label]``."""
    n = cfg.difficulty * cfg.nuisance
    o = cfg.difficulty * cfg.overlap
    base = label if label < len(CLASSES) else 0
    stage = float(np.clip(base + rng.uniform(-0.3, 0.3) + rng.normal(0.0, 0.35 * o), 0.0, 4.4))
    weights = np.asarray(cfg.planes, dtype=float)
    plane = str(rng.choice(["axial", "coronal", "oblique"], p=weights / weights.sum()))
    iop = {"axial": AXIAL, "coronal": CORONAL}.get(plane) or _oblique_iop(rng, *cfg.oblique_deg)
    return AbdomenPatient(
        label=label,
        stage=stage,
        weighting=str(rng.choice(list(cfg.weightings))),
        plane=plane,
        iop=tuple(iop),
        body_scale=rng.uniform(1 - 0.12 * n, 1 + 0.12 * n),
        liver_scale=rng.uniform(1 - 0.08 * n, 1 + 0.08 * n),
        shift=(rng.normal(0, 12 * n), rng.normal(0, 6 * n), rng.normal(0, 8 * n)),
        rotation_deg=rng.uniform(-6, 6) * n,
        fov_mm=cfg.fov_mm * rng.uniform(1 - 0.1 * n, 1 + 0.1 * n),
        slice_thickness=rng.uniform(*cfg.slice_thickness_mm),
        scanner_scale=float(1000.0 * np.exp(rng.normal(0.0, 0.5 * n))),
        bias=rng.uniform(0.05, 0.05 + 0.35 * n),
        noise=rng.uniform(0.01, 0.01 + 0.05 * n),
        blur_vox=rng.uniform(0.3, 0.3 + 0.7 * n),
        severity=rng.uniform(0.4, 1.0),
    )


def render(
    p: AbdomenPatient, cfg: SynthConfig, rng: np.random.Generator
) -> tuple[np.ndarray, Grid]:
    """Render one study: MR signal (arbitrary units) indexed ``[slice, row, col]`` and its grid."""
    nz = max(8, int(round(cfg.z_extent_mm / p.slice_thickness)))
    grid = Grid.centred(cfg.matrix, p.fov_mm, nz, p.slice_thickness, p.iop)
    shape = grid.shape
    z, y, x = grid.coords()
    z = z - p.shift[0]
    x, y = rotate_xy(x - p.shift[2], y - p.shift[1], p.rotation_deg)  # patient about S-I
    # Coordinates stay broadcastable: on axial grids what depends on x, y only stays 2-D.
    full = (lambda m: np.broadcast_to(m, shape)) if grid.is_axial else (lambda m: m)

    def E(centre, radii) -> np.ndarray:  # noqa: N802 - an ellipsoid's normalised radius
        return ellipsoid_in(shape, to_index, (z, y, x), centre, radii)

    to_index = _to_index(grid, p)
    w = TISSUE[p.weighting]
    s = p.stage
    a, b = 165.0 * p.body_scale, 120.0 * p.body_scale  # body half-axes (L-R, A-P)

    body_r2 = (x / a) ** 2 + (y / b) ** 2
    vol = np.zeros(shape, dtype=np.float32)
    vol[full(body_r2 <= 1.0)] = w["fat"]
    inner = full(body_r2 <= 0.86**2)
    bowel = w["bowel"] * (1.0 + 0.15 * smooth_field(shape, _sig(grid, 9.0), rng))
    vol[inner] = bowel[inner]
    # Lung bases above the diaphragm dome (seen on coronal and oblique slices).
    vol[inner & (z > 100.0 + 0.002 * (x + 0.1 * a) ** 2)] = 0.03 * w["fat"]

    def put(mask: np.ndarray, value: float | np.ndarray) -> None:
        mask = full(mask)
        vol[mask] = value if np.isscalar(value) else value[mask]

    for side in (-1.0, 1.0):  # paraspinal muscles
        put(
            E((0.0, 0.62 * b, side * 0.3 * b), (1e4, 0.2 * b, 0.22 * b)) <= 1,
            w["muscle"],
        )
    spine = np.sqrt((x / (0.16 * b)) ** 2 + ((y - 0.5 * b) / (0.16 * b)) ** 2)
    put(spine <= 1.0, 0.3 * w["muscle"])  # cortex
    put(spine <= 0.85, w["marrow"])
    for side, zc in ((-1.0, -70.0), (1.0, -60.0)):  # kidneys
        put(
            E((zc, 0.42 * b, side * 0.55 * b), (50.0, 24.0, 28.0)) <= 1,
            w["kidney"],
        )

    # Spleen enlarges with stage; liver: right lobe shrinks, caudate grows.
    spleen_scale = 1.0 + 0.15 * s
    spleen = E((40.0, 0.3 * b, 0.62 * a), np.array([55.0, 45.0, 28.0]) * spleen_scale) <= 1
    put(spleen, w["spleen"])
    ls = p.liver_scale * (1.12 if p.finding == "steatosis" else 1.0)
    r_right = E(
        (25.0, 0.02 * b, -0.33 * a),
        np.array([80.0, 0.62 * b, 0.5 * a]) * ls * (1 - 0.07 * s),
    )
    r_left = E((45.0, -0.38 * b, 0.15 * a), np.array([45.0, 0.3 * b, 0.42 * a]) * ls)
    r_caud = E((35.0, 0.2 * b, -0.05 * a), np.array([35.0, 22.0, 22.0]) * ls * (1 + 0.16 * s))
    r_liver = np.minimum(np.minimum(r_right, r_left), r_caud)
    # One random field makes the regenerative nodules (its peaks), the fibrous septa around
    # them (its zero crossings) and, where they reach the surface, its nodularity.
    nod = smooth_field(shape, _sig(grid, 6.0), rng)
    r_liver = r_liver + (0.006 + 0.03 * s) * np.abs(nod)
    liver = (r_liver <= 1.0) & inner

    if s >= 3.4:  # ascites: fluid around the liver and in the flanks
        fluid = (r_liver > 1.0) & (r_liver <= 1.0 + 0.12 * (s - 3.2)) & inner
        put(fluid, w["fluid"])

    # Parenchyma: regenerative nodules and fibrous septa (zero crossings of a random field).
    liver_val = np.full(shape, w["liver"], dtype=np.float32)
    liver_val += w["liver"] * (0.04 + w["nodule"] * s / 2.0) * nod
    septa = np.abs(nod) < 0.05 * s
    liver_val[septa] += w["liver"] * w["septa"] * min(1.0, s / 2.5)
    finding = p.finding
    if finding == "steatosis":
        liver_val *= 1.0 + (0.25 if p.weighting == "T1" else 0.35) * p.severity
    elif finding == "iron-overload":
        liver_val *= 1.0 - (0.4 if p.weighting == "T1" else 0.7) * p.severity
    put(liver, liver_val)
    if finding == "iron-overload" and p.severity > 0.7:  # transfusional: spleen too
        vol[spleen & ~liver] *= 0.5
    if finding == "hepatic-cyst":
        idx = np.flatnonzero((r_liver <= 0.8).ravel())
        for _ in range(int(rng.integers(1, 4))):
            c = np.unravel_index(rng.choice(idx), shape)
            r = rng.uniform(7.0, 12.0 + 12.0 * p.severity)
            d = E(tuple(float(np.broadcast_to(v, shape)[c]) for v in (z, y, x)), (r, r, r))
            put((d <= 1.0) & liver, w["fluid"])

    # Vessels: aorta and IVC as flow voids along S-I.
    for xc, yc, r in ((0.08 * a, 0.3 * b, 11.0), (-0.12 * a, 0.25 * b, 12.0)):
        put(np.sqrt((x - xc) ** 2 + (y - yc) ** 2) <= r, w["vessel"])

    vol = ndimage.gaussian_filter(vol, p.blur_vox, truncate=2.0)  # partial volume, radius 2
    # Receive-coil bias field: smooth (a random quadratic in patient space) and multiplicative.
    # Evaluated on a coarse grid of the same extent and interpolated: it varies over the body.
    coef = rng.normal(0.0, 1.0, 6).astype(np.float32)
    axes = [np.linspace(0, n - 1, max(2, n // 4 + 1)) for n in shape]
    idx = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    zyx = idx @ np.linalg.inv(to_index)[:3, :3].T + np.linalg.inv(to_index)[:3, 3]
    q, v, u = zyx[..., 0] / 200.0, zyx[..., 1] / 150.0, zyx[..., 2] / 200.0
    field = coef[0] * u + coef[1] * v + coef[2] * q + coef[3] * u * v + coef[4] * v * q
    field += coef[5] * (u * u - q * q)
    vol *= upsample(np.exp(p.bias / 2.0 * field).astype(np.float32), shape)
    vol *= np.float32(p.scanner_scale)
    vol = rician(vol, p.noise * p.scanner_scale * w["fat"], rng)
    return vol, grid


def _to_index(grid: Grid, p: AbdomenPatient) -> np.ndarray:
    """Homogeneous map from patient-frame (z, y, x) mm to (slice, row, col) indices."""
    c, s = np.cos(np.deg2rad(p.rotation_deg)), np.sin(np.deg2rad(p.rotation_deg))
    rot = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    shift = np.eye(4)
    shift[:3, 3] = -np.array(p.shift[::-1])  # (x, y, z)
    flip = np.eye(4)[[2, 1, 0, 3]]  # (x, y, z) <-> (z, y, x); also (col, row, slice) <-> (k, r, c)
    patient_from_index = flip @ rot @ shift @ grid.lps_affine() @ flip
    return np.linalg.inv(patient_from_index)


def _sig(grid: Grid, mm: float) -> tuple[float, float, float]:
    """A correlation length in mm as voxels along each grid axis."""
    return tuple(mm / d for d in grid.spacing)  # type: ignore[return-value]
