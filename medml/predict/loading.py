"""Read one prediction input (NIfTI file or DICOM series folder) as canonical RAS data.

The same readers and the same checks as ingestion (:class:`medml.ingest.checks.SeriesChecks`,
built from ``settings.ingest``), so a scan is accepted or refused, and seen, the same way in
training and in production; nothing identifying is kept (only voxels and geometry).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from medml.config import IngestConfig
from medml.ingest import budget, dicom, nifti
from medml.ingest.checks import SeriesChecks


def _checks(checks: SeriesChecks | IngestConfig | None) -> SeriesChecks:
    if isinstance(checks, IngestConfig):
        return SeriesChecks.from_config(checks)
    return checks or SeriesChecks()


def load_dicom_folder(path: Path, checks: SeriesChecks) -> tuple[np.ndarray, np.ndarray]:
    """The one image series in ``path``, judged as ingestion judges it: files that ingestion
    would skip or quarantine are left out, then the series must pass the same checks."""
    slices, refused = [], []
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        try:
            header = dicom.index_header(f, checks.max_voxels)
        except budget.BudgetError as exc:  # a deflated file inflating past its budget
            refused.append(f"{f.name}: {exc}")
            continue
        except Exception:
            continue
        problem = dicom.classify(header, checks.max_voxels)
        if problem is not None and checks.action(problem.case) != "convert":
            refused.append(f"{f.name}: {problem.reason}")
            continue
        slices.append(dicom.Slice(f, dicom.compact_header(header)))
    groups = dicom.group_series(slices)
    if len(groups) != 1:
        why = f" ({refused[0]})" if refused and not groups else ""
        raise ValueError(f"{path}: expected one DICOM image volume, found {len(groups)}{why}")
    verdict = checks.judge(groups[0])
    if verdict.action != "convert":
        raise ValueError(f"{path}: {verdict.reason}")
    return dicom.load_volume(groups[0])


def load_input(
    path: str | Path, checks: SeriesChecks | IngestConfig | None = None
) -> tuple[MetaTensor, str]:
    """Channel-first MetaTensor of the stored values with their affine, and a scan id derived
    from the voxels (:func:`medml.ingest.nifti.voxel_hash`: a DICOM series and the NIfTI
    ingestion wrote for it share it).

    ``checks`` (or the IngestConfig to build them from) decide which DICOM series are accepted;
    pass ``settings.ingest`` so prediction refuses exactly what ingestion refuses. The default
    is IngestConfig's defaults.
    """
    path, checks = Path(path), _checks(checks)
    if path.is_dir():
        data, affine = load_dicom_folder(path, checks)
    elif path.is_file() and nifti.is_nifti_name(path):
        data, affine = nifti.load_nifti(path, checks.max_voxels)
    else:
        raise ValueError(f"{path}: not a NIfTI file or a DICOM series folder")
    # The stored array and its affine, not a reoriented float32 copy: the chain reads the RAS
    # grid from the stored axes and gathers the voxels it needs before converting them
    # (medml.data.transforms.Preprocessd).
    if data.dtype.kind == "u" and data.dtype.itemsize > 1:  # torch's uint16/32 support is thin
        data = data.astype(np.int64 if data.dtype.itemsize > 2 else np.int32, order="F")
    elif data.dtype.kind not in "iuf" or data.dtype.byteorder == ">":
        data = data.astype(data.dtype.newbyteorder("=") if data.dtype.kind in "iuf" else np.float32)
    scan_id = nifti.voxel_hash(data, affine)[:16]
    tensor = MetaTensor(torch.from_numpy(data)[None], affine=torch.as_tensor(affine))
    return tensor, scan_id
