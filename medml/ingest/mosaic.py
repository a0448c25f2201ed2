"""Mosaics: one DICOM plane holding a whole volume as a grid of tiles (Siemens: cut into
slices; UIH: recognised and refused).

The tile count and the slice order come from the Siemens CSA image header (0029,1010), read
with nibabel's CSA reader (nibabel.nicom.csareader): ``NumberOfImagesInMosaic`` and
``SliceNormalVector``. ImagePositionPatient of a mosaic is the corner of the whole grid; each
tile's position is moved to the tile's own corner (as nibabel's MosaicWrapper and dcm2niix do)
and then stepped along the CSA slice normal by the slice spacing.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

CSA_IMAGE_HEADER = (0x0029, 0x1010)
SIEMENS_N_MOSAIC = (0x0019, 0x100A)  # NumberOfImagesInMosaic, also in the CSA header


def _csa_reader():
    with warnings.catch_warnings():  # nibabel.nicom warns on import that it is experimental
        warnings.simplefilter("ignore")
        from nibabel.nicom import csareader
    return csareader


def is_mosaic(ds) -> bool:
    """ImageType MOSAIC on a single-frame object. An enhanced object of several frames keeps
    the word after the scanner has cut the tiles into frames (Siemens XA30; dcm2niix issue
    553): its frames are slices, read as any enhanced object's."""
    if "MOSAIC" not in [str(v).upper() for v in (ds.get("ImageType") or [])]:
        return False
    return int(ds.get("NumberOfFrames", 1) or 1) <= 1


def is_uih_mosaic(ds) -> bool:
    """UIH's mosaic (ImageType VFRAME): tiles in a non-square grid, their positions in a
    private sequence; not converted."""
    return "VFRAME" in [str(v).upper() for v in (ds.get("ImageType") or [])]


def mosaic_info(ds) -> dict[str, Any]:
    """``{"n": tiles, "normal": [x, y, z]}`` from the CSA header, or ``{"error": why}``.

    Parsed once per Dataset (classification and the compact header both ask).
    """
    cached = getattr(ds, "_medml_mosaic_info", None)
    if cached is None:
        cached = _mosaic_info(ds)
        object.__setattr__(ds, "_medml_mosaic_info", cached)
    return cached


def _mosaic_info(ds) -> dict[str, Any]:
    csa = None
    if CSA_IMAGE_HEADER in ds:
        try:
            csa = _csa_reader().get_csa_header(ds, "image")
        except Exception as exc:  # a damaged or foreign private block
            return {"error": f"unreadable Siemens CSA header ({type(exc).__name__})"}
    n = normal = None
    if csa:
        n = _csa_reader().get_n_mosaic(csa)
        normal = _csa_reader().get_slice_normal(csa)
    if not n and SIEMENS_N_MOSAIC in ds:
        n = ds[SIEMENS_N_MOSAIC].value
    if not n:
        return {"error": "Siemens mosaic without NumberOfImagesInMosaic"}
    if normal is None:
        return {"error": "Siemens mosaic without a CSA SliceNormalVector: slice order unknown"}
    rows, cols, k = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0), grid(int(n))
    if not rows or rows % k or cols % k:
        return {"error": f"Siemens mosaic of {rows}x{cols} pixels does not divide into the "
                         f"{k}x{k} grid of {n} tiles (NumberOfImagesInMosaic)"}  # fmt: skip
    if not float(ds.get("SpacingBetweenSlices", 0) or ds.get("SliceThickness", 0) or 0) > 0:
        return {"error": "Siemens mosaic without SpacingBetweenSlices or SliceThickness"}
    return {"n": int(n), "normal": [float(v) for v in normal]}


def grid(n_tiles: int) -> int:
    """Tiles per row and column of the mosaic grid."""
    return math.ceil(math.sqrt(n_tiles))


def tile_geometry(header: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-tile geometry overrides (position, matrix) of a mosaic header, in slice order."""
    info = header["_mosaic"]
    n, k = info["n"], grid(info["n"])
    rows, cols = int(header["Rows"]), int(header["Columns"])
    if rows % k or cols % k:
        raise ValueError(f"mosaic {rows}x{cols} does not divide into a {k}x{k} grid")
    tile_rows, tile_cols = rows // k, cols // k
    iop = np.asarray(header["ImageOrientationPatient"], float)
    row_dir, col_dir = iop[:3], iop[3:]
    row_spacing, col_spacing = (float(v) for v in header["PixelSpacing"])
    corner = np.asarray(header["ImagePositionPatient"], float)
    first = (
        corner
        + col_dir * row_spacing * (rows - tile_rows) / 2
        + row_dir * col_spacing * (cols - tile_cols) / 2
    )
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    if float(normal @ np.asarray(info["normal"], float)) < 0:  # slices run against row x col
        normal = -normal
    spacing = float(header.get("SpacingBetweenSlices") or header.get("SliceThickness") or 0)
    if spacing <= 0:
        raise ValueError("mosaic without SpacingBetweenSlices or SliceThickness")
    return [
        {
            "ImagePositionPatient": (first + i * spacing * normal).tolist(),
            "Rows": tile_rows,
            "Columns": tile_cols,
        }
        for i in range(n)
    ]


def cut_tile(plane: np.ndarray, n_tiles: int, index: int) -> np.ndarray:
    """Tile ``index`` (row-major in the grid) of a mosaic plane, as a view."""
    k = grid(n_tiles)
    tile_rows, tile_cols = plane.shape[0] // k, plane.shape[1] // k
    r, c = divmod(index, k)
    return plane[r * tile_rows : (r + 1) * tile_rows, c * tile_cols : (c + 1) * tile_cols]
