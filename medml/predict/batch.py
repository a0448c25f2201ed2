"""Batch inference: many scans through a registered model, one output row per input."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from tqdm.auto import tqdm

from medml.ingest.nifti import is_nifti_name
from medml.io import atomic_path


@dataclass(frozen=True)
class PredictionSummary:
    out: Path
    n_inputs: int
    n_errors: int
    seconds: float
    counts: dict[str, int]


def discover_inputs(inputs: Sequence[str | Path]) -> list[str]:
    """Expand folders into NIfTI files and DICOM series folders (folders of files, no NIfTI)."""
    found: list[str] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = [p for p in item.iterdir() if p.is_file()]
            if files and not any(is_nifti_name(p) for p in files):
                found.append(str(item))  # a series folder
            found.extend(str(p) for p in sorted(files) if is_nifti_name(p))
            found.extend(discover_inputs(sorted(p for p in item.iterdir() if p.is_dir())))
        else:
            found.append(str(item))  # files, and paths that don't exist: an error row each
    return found


def predict_frame(
    model_uri: str, frame: pd.DataFrame, out: Path, batch_size: int = 8, progress: bool = True
) -> PredictionSummary:
    """Predict each row of ``frame`` (``path``, optional ``scan_id``); write a CSV atomically."""
    start = time.perf_counter()
    model = mlflow.pyfunc.load_model(model_uri)
    parts = []
    chunks = range(0, len(frame), batch_size)
    for i in tqdm(chunks, desc="predict", unit="batch", disable=not progress):
        parts.append(model.predict(frame.iloc[i : i + batch_size].reset_index(drop=True)))
    result = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    with atomic_path(out, suffix=".csv") as tmp:
        result.to_csv(tmp, index=False)
    n_err = int(result["error"].notna().sum()) if len(result) else 0
    counts = result["predicted_class"].value_counts().to_dict() if len(result) else {}
    return PredictionSummary(Path(out), len(result), n_err, time.perf_counter() - start, counts)
