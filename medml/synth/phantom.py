"""Analytic building blocks for CT/MRI phantoms: grids, ellipsoids, vessel trees, random fields.

Shapes are evaluated on a voxel grid in patient LPS millimetres, so the same phantom can be
sampled at any slice thickness or matrix. Written by hand: no library draws anatomy phantoms
with controllable pathology, and these are a few lines of numpy each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Grid:
    """Voxel centres of an axial stack: arrays are indexed ``[slice, row, col]``.

    Columns run along LPS +x (patient left), rows along +y (posterior), slices along +z (head).
    """

    nz: int
    ny: int
    nx: int
    spacing: tuple[float, float, float]  # (dz, dy, dx) in mm
    origin: tuple[float, float, float]  # (z0, y0, x0): centre of voxel [0, 0, 0], LPS mm

    @classmethod
    def centred(cls, matrix: int, fov_mm: float, nz: int, dz: float) -> Grid:
        d = fov_mm / matrix
        return cls(
            nz,
            matrix,
            matrix,
            (dz, d, d),
            (-(nz - 1) * dz / 2, -(matrix - 1) * d / 2, -(matrix - 1) * d / 2),
        )

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable z, y, x coordinate arrays in mm."""
        z = self.origin[0] + self.spacing[0] * np.arange(self.nz)
        y = self.origin[1] + self.spacing[1] * np.arange(self.ny)
        x = self.origin[2] + self.spacing[2] * np.arange(self.nx)
        return z[:, None, None], y[None, :, None], x[None, None, :]

    def lps_affine(self) -> np.ndarray:
        """4x4 affine from (col, row, slice) indices to LPS mm."""
        aff = np.eye(4)
        aff[0, 0], aff[1, 1], aff[2, 2] = self.spacing[2], self.spacing[1], self.spacing[0]
        aff[:3, 3] = (self.origin[2], self.origin[1], self.origin[0])
        return aff


def rotate_xy(x: np.ndarray, y: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate in-plane coordinates about the z axis."""
    t = np.deg2rad(degrees)
    return x * np.cos(t) - y * np.sin(t), x * np.sin(t) + y * np.cos(t)


def ellipsoid(
    z: np.ndarray,
    y: np.ndarray,
    x: np.ndarray,
    centre: tuple[float, float, float],
    radii: tuple[float, float, float],
) -> np.ndarray:
    """Normalised radius ``r`` (``r <= 1`` inside) of an axis-aligned ellipsoid (z, y, x order)."""
    return np.sqrt(
        ((z - centre[0]) / radii[0]) ** 2
        + ((y - centre[1]) / radii[1]) ** 2
        + ((x - centre[2]) / radii[2]) ** 2
    )


def smooth_field(
    shape: tuple[int, int, int], sigma_vox: tuple[float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field of the given correlation length."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    field -= field.mean()
    field /= field.std() + 1e-8
    return field


def vessel_tree(
    points: np.ndarray,
    root: np.ndarray,
    direction: np.ndarray,
    length: float,
    radius: float,
    depth: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Boolean mask over ``points`` (N x 3, mm) of a randomly branching tube tree."""
    end = root + direction * length
    seg = end - root
    t = np.clip(((points - root) @ seg) / (seg @ seg), 0.0, 1.0)
    dist = np.linalg.norm(points - (root + t[:, None] * seg), axis=1)
    mask = dist <= radius
    if depth > 0:
        for _ in range(2):
            child = direction + rng.normal(0.0, 0.6, size=3)
            child /= np.linalg.norm(child)
            mask |= vessel_tree(points, end, child, length * 0.7, radius * 0.65, depth - 1, rng)
    return mask
