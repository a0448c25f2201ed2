"""Read one prediction input (NIfTI file or DICOM series folder) as canonical RAS data.

The same readers and checks as ingestion, so a scan is seen the same way in training and
in production; nothing identifying is kept (only voxels and geometry).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from medml.ingest import dicom, nifti


def load_input(path: str | Path) -> tuple[MetaTensor, str]:
    """Channel-first MetaTensor (with its RAS affine) and a content-derived scan id."""
    path = Path(path)
    if path.is_dir():
        slices = []
        for f in sorted(p for p in path.iterdir() if p.is_file()):
            try:
                header = dicom.read_header(f)
            except Exception:
                continue
            if dicom.image_problem(header) is None:
                slices.append(dicom.Slice(f, header))
        groups = dicom.group_series(slices)
        if len(groups) != 1:
            raise ValueError(f"{path}: expected one DICOM image series, found {len(groups)}")
        dicom.sort_and_check(groups[0], min_slices=2)
        data, affine = dicom.load_volume(groups[0])
    elif path.is_file() and nifti.is_nifti_name(path):
        data, affine = nifti.load_nifti(path)
    else:
        raise ValueError(f"{path}: not a NIfTI file or a DICOM series folder")
    img = nifti.to_canonical(data, affine)
    arr = np.asarray(img.dataobj, dtype=np.float32)
    scan_id = hashlib.sha256(arr.tobytes()).hexdigest()[:16]
    tensor = MetaTensor(torch.from_numpy(arr)[None], affine=torch.as_tensor(img.affine))
    return tensor, scan_id
