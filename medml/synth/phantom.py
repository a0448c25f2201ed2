"""Analytic building blocks for CT/MRI phantoms: grids, ellipsoids, vessel trees, random fields.

Shapes are evaluated on a voxel grid in patient LPS millimetres, so the same phantom can be
sampled at any slice thickness, matrix or acquisition plane. Written by hand: no library draws
anatomy phantoms with controllable pathology, and these are a few lines of numpy each. They are
tuned for speed (tens of 64^3 volumes per second on one core): random fields are drawn on a
coarse grid and interpolated, and tubes are only evaluated inside their bounding boxes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


@dataclass(frozen=True)
class Grid:
    """Voxel centres of a stack of slices: arrays are indexed ``[slice, row, col]``.

    ``iop`` is DICOM's ImageOrientationPatient: the LPS direction along a row (column index
    increasing), then down a column (row index increasing); slices advance along their cross
    product. The default is axial: columns along +x (patient left), rows along +y (posterior),
    slices along +z (head).
    """

    nz: int
    ny: int
    nx: int
    spacing: tuple[float, float, float]  # (dz, dy, dx): slice, row and column spacing in mm
    origin: tuple[float, float, float]  # (z, y, x) LPS mm of the centre of voxel [0, 0, 0]
    iop: tuple[float, float, float, float, float, float] = AXIAL

    @classmethod
    def centred(
        cls,
        matrix: int,
        fov_mm: float,
        nz: int,
        dz: float,
        iop: tuple[float, float, float, float, float, float] = AXIAL,
    ) -> Grid:
        """A square ``matrix`` x ``matrix`` x ``nz`` stack centred on the LPS origin."""
        d = fov_mm / matrix
        half = (nz - 1) * dz / 2, (matrix - 1) * d / 2, (matrix - 1) * d / 2
        row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
        corner = -(half[2] * row + half[1] * col + half[0] * np.cross(row, col))
        return cls(nz, matrix, matrix, (dz, d, d), (corner[2], corner[1], corner[0]), tuple(iop))

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.nz, self.ny, self.nx

    @property
    def is_axial(self) -> bool:
        return np.allclose(self.iop, AXIAL)

    @property
    def normal(self) -> np.ndarray:
        """LPS unit vector along which slices advance."""
        return np.cross(self.iop[:3], self.iop[3:])

    def position(self, k: int) -> np.ndarray:
        """LPS (x, y, z) of the first voxel of slice ``k``: DICOM's ImagePositionPatient."""
        return np.array(self.origin[::-1]) + k * self.spacing[0] * self.normal

    def lps_affine(self) -> np.ndarray:
        """4x4 affine from (col, row, slice) indices to LPS mm."""
        aff = np.eye(4)
        aff[:3, 0] = np.asarray(self.iop[:3]) * self.spacing[2]
        aff[:3, 1] = np.asarray(self.iop[3:]) * self.spacing[1]
        aff[:3, 2] = self.normal * self.spacing[0]
        aff[:3, 3] = self.origin[::-1]
        return aff

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable z, y, x coordinate arrays in mm (axial grids only)."""
        if not self.is_axial:
            raise ValueError("axes() needs an axial grid; use coords()")
        z = self.origin[0] + self.spacing[0] * np.arange(self.nz, dtype=np.float32)
        y = self.origin[1] + self.spacing[1] * np.arange(self.ny, dtype=np.float32)
        x = self.origin[2] + self.spacing[2] * np.arange(self.nx, dtype=np.float32)
        return z[:, None, None], y[None, :, None], x[None, None, :]

    def coords(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """LPS z, y, x of every voxel, any orientation (broadcast views for axial grids)."""
        if self.is_axial:
            return self.axes()
        k, r, c = (np.arange(n, dtype=np.float32) for n in self.shape)
        aff = self.lps_affine().astype(np.float32)
        out = []
        for axis in (2, 1, 0):  # z, y, x rows of the affine
            a = aff[axis]
            out.append(
                a[2] * k[:, None, None] + a[1] * r[None, :, None] + a[0] * c[None, None, :] + a[3]
            )
        return out[0], out[1], out[2]


def rotate_xy(x: np.ndarray, y: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate in-plane coordinates about the z axis."""
    c, s = float(np.cos(np.deg2rad(degrees))), float(np.sin(np.deg2rad(degrees)))
    return x * c - y * s, x * s + y * c


def ellipsoid(
    z: np.ndarray,
    y: np.ndarray,
    x: np.ndarray,
    centre: tuple[float, float, float],
    radii: tuple[float, float, float],
) -> np.ndarray:
    """Normalised radius ``r`` (``r <= 1`` inside) of an axis-aligned ellipsoid (z, y, x order)."""
    (cz, cy, cx), (rz, ry, rx) = (float(v) for v in centre), (float(v) for v in radii)
    return np.sqrt(((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)


def ellipsoid_in(
    shape: tuple[int, int, int],
    to_index: np.ndarray,
    coords: tuple[np.ndarray, np.ndarray, np.ndarray],
    centre: tuple[float, float, float],
    radii: tuple[float, float, float],
    reach: float = 1.5,
) -> np.ndarray:
    """:func:`ellipsoid` over the whole grid, evaluated only where ``r <= reach`` is possible.

    ``to_index`` maps homogeneous (z, y, x, 1) shape coordinates to (slice, row, col); outside
    the box around the ellipsoid scaled by ``reach`` the result is ``reach + 1``. Small organs
    then cost a fraction of a full-volume evaluation.
    """
    c, r = np.asarray(centre, dtype=float), np.asarray(radii, dtype=float) * reach
    signs = 2 * np.array(list(np.ndindex(2, 2, 2))) - 1  # the 8 corners of the box
    idx = np.c_[c + r * signs, np.ones(8)] @ to_index.T
    lo = np.maximum(np.floor(idx[:, :3].min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(idx[:, :3].max(axis=0)).astype(int) + 1, shape)
    out = np.full(shape, reach + 1.0, dtype=np.float32)
    if np.all(hi > lo):
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        z, y, x = (np.broadcast_to(v, shape)[box] for v in coords)
        out[box] = ellipsoid(z, y, x, centre, radii)
    return out


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear interpolation weights (n_out x n_in), corners aligned."""
    pos = np.linspace(0.0, n_in - 1, n_out)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2) if n_in > 1 else np.zeros(n_out, int)
    w = np.zeros((n_out, n_in), dtype=np.float32)
    if n_in == 1:
        w[:, 0] = 1.0
        return w
    frac = pos - lo
    w[np.arange(n_out), lo] = 1.0 - frac
    w[np.arange(n_out), lo + 1] = frac
    return w


def upsample(coarse: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Separable trilinear upsampling of a 3-D array by three matrix products.

    Far faster than ``ndimage.zoom`` for the smooth fields drawn here (corners are aligned).
    """
    (n0, n1, n2), (c0, c1, c2) = shape, coarse.shape
    w0, w1, w2 = _interp_matrix(n0, c0), _interp_matrix(n1, c1), _interp_matrix(n2, c2)
    out = (w0 @ coarse.reshape(c0, c1 * c2)).reshape(n0, c1, c2)
    out = np.matmul(w1, out)  # (n1, c1) @ (n0, c1, c2) -> (n0, n1, c2)
    return np.ascontiguousarray(out @ w2.T, dtype=np.float32)


def smooth_field(
    shape: tuple[int, int, int], sigma_vox: tuple[float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """Zero-mean Gaussian random field of about unit variance and the given correlation length.

    Along axes whose correlation length is two voxels or more the field is drawn on a grid
    coarser by about that length and interpolated back: the same look for a fraction of the cost.
    """
    factors = [max(1, int(round(s))) for s in sigma_vox]
    coarse_shape = tuple(
        n if f == 1 else max(2, int(np.ceil((n - 1) / f)) + 1) for n, f in zip(shape, factors)
    )
    sig = [
        s / (n - 1) * (c - 1) if c != n else s for s, n, c in zip(sigma_vox, shape, coarse_shape)
    ]
    noise = rng.standard_normal(coarse_shape, dtype=np.float32)
    field = ndimage.gaussian_filter(noise, sig, truncate=3.0)
    field -= field.mean()  # normalised before upsampling: fewer passes over the full grid
    field /= field.std() + 1e-8
    return upsample(field, shape) if coarse_shape != tuple(shape) else field


@dataclass(frozen=True)
class Segment:
    """A straight tube from ``a`` to ``b`` (LPS z, y, x mm) of the given radius."""

    a: np.ndarray
    b: np.ndarray
    radius: float


def vessel_segments(
    root: np.ndarray,
    direction: np.ndarray,
    length: float,
    radius: float,
    depth: int,
    rng: np.random.Generator,
) -> list[Segment]:
    """A randomly branching tube tree (each segment forks in two, 0.7x longer, 0.65x thinner)."""
    end = root + direction * length
    segs = [Segment(root, end, radius)]
    if depth > 0:
        for _ in range(2):
            child = direction + rng.normal(0.0, 0.6, size=3)
            child /= np.linalg.norm(child)
            segs += vessel_segments(end, child, length * 0.7, radius * 0.65, depth - 1, rng)
    return segs


def draw_tubes(
    shape: tuple[int, int, int],
    to_index: np.ndarray,
    coords: tuple[np.ndarray, np.ndarray, np.ndarray],
    segments: list[Segment],
) -> np.ndarray:
    """Boolean volume of the voxels within ``radius`` of any segment.

    ``to_index`` maps homogeneous (z, y, x, 1) shape coordinates to (slice, row, col) indices;
    ``coords`` are the broadcastable z, y, x shape coordinates of every voxel. Distances are
    computed only inside each segment's bounding box, which is what makes trees cheap.
    """
    mask = np.zeros(shape, dtype=bool)
    for s in segments:
        corners = np.array(
            [
                [s.a[0] + dz, s.a[1] + dy, s.a[2] + dx, 1.0]
                for dz in (-s.radius, s.radius)
                for dy in (-s.radius, s.radius)
                for dx in (-s.radius, s.radius)
            ]
            + [
                [s.b[0] + dz, s.b[1] + dy, s.b[2] + dx, 1.0]
                for dz in (-s.radius, s.radius)
                for dy in (-s.radius, s.radius)
                for dx in (-s.radius, s.radius)
            ]
        )
        idx = corners @ to_index.T
        lo = np.maximum(np.floor(idx[:, :3].min(axis=0)).astype(int), 0)
        hi = np.minimum(np.ceil(idx[:, :3].max(axis=0)).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        z, y, x = (np.broadcast_to(c, shape)[box] for c in coords)
        seg = s.b - s.a
        t = ((z - s.a[0]) * seg[0] + (y - s.a[1]) * seg[1] + (x - s.a[2]) * seg[2]) / (seg @ seg)
        t = np.clip(t, 0.0, 1.0)
        d2 = (
            (z - s.a[0] - t * seg[0]) ** 2
            + (y - s.a[1] - t * seg[1]) ** 2
            + (x - s.a[2] - t * seg[2]) ** 2
        )
        mask[box] |= d2 <= s.radius**2
    return mask


def rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise in both channels (MRI's Rician noise)."""
    re = signal + rng.standard_normal(signal.shape, dtype=np.float32) * sigma
    im = rng.standard_normal(signal.shape, dtype=np.float32) * sigma
    return np.sqrt(re * re + im * im)
