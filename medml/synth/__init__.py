"""Synthetic datasets: phantoms written as real DICOM series and NIfTI, with ``labels.csv``.

Each generator module (``covid_ct`` today; ``cirrhosis_mri`` and novel findings later) exposes
``CLASSES``, a ``draw`` of per-study parameters and a ``render`` function; :func:`generate`
does the writing, the identities and the label file for all of them.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from medml.config import SynthConfig
from medml.io import atomic_path, atomic_write_text
from medml.synth import covid_ct
from medml.synth.identity import Identity
from medml.synth.writers import _uid, write_dicom_series, write_nifti

log = logging.getLogger(__name__)

MANIFEST = "synth.json"  # the generating config; a rerun with the same config writes nothing
LABEL_COLUMNS = ("patient_id", "study_uid", "series_uid", "path", "label")


@dataclass(frozen=True)
class SynthResult:
    """What :func:`generate` wrote."""

    out: Path
    labels_csv: Path
    n_patients: int
    n_studies: int


def generate(cfg: SynthConfig, out: Path, progress: bool = True) -> SynthResult:
    """Write ``cfg.n_patients`` patients (some with a follow-up study) under ``out``.

    Deterministic for ``cfg.seed``: the same config writes the same voxels and UIDs, so when
    ``out`` already holds the dataset of this exact config (``synth.json``), nothing is
    rewritten; a dataset of another config written there before is replaced. Classes are
    balanced by cycling through them; with ``format: mixed`` a random 30 % of patients are
    written as NIfTI, the rest as DICOM series.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest, labels_csv = out / MANIFEST, out / "labels.csv"
    wanted = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    if labels_csv.exists() and manifest.exists() and manifest.read_text() == wanted:
        n_studies = sum(1 for _ in labels_csv.open()) - 1
        log.info("%s already holds this synthetic dataset; nothing to write", out)
        return SynthResult(out, labels_csv, cfg.n_patients, n_studies)
    if manifest.exists():  # our own earlier output, of another config
        for sub in ("dicom", "nifti"):
            shutil.rmtree(out / sub, ignore_errors=True)
    rows: list[dict[str, str]] = []
    n_nifti = {"dicom": 0, "nifti": cfg.n_patients, "mixed": round(0.3 * cfg.n_patients)}[
        cfg.format
    ]
    nifti_patients = set(
        np.random.default_rng([cfg.seed, 2**31]).permutation(cfg.n_patients)[:n_nifti].tolist()
    )
    for pat in tqdm(range(cfg.n_patients), desc="synth", unit="patient", disable=not progress):
        rng = np.random.default_rng([cfg.seed, pat])
        identity = Identity.draw(rng)
        label = pat % len(covid_ct.CLASSES)
        as_dicom = pat not in nifti_patients
        n_studies = 2 if rng.random() < cfg.followup_fraction else 1
        for study in range(1, n_studies + 1):
            params = covid_ct.ChestPatient.draw(label, cfg, rng)
            volume, grid = covid_ct.render_chest(params, cfg, rng)
            seed_key = f"{cfg.kind}-{cfg.seed}-{pat}-{study}"
            study_uid, series_uid = _uid(seed_key, "study"), _uid(seed_key, "series")
            if as_dicom:
                rel = Path("dicom") / f"case-{pat:04d}" / f"study-{study}" / "series-1"
                write_dicom_series(
                    volume,
                    grid,
                    out / rel,
                    identity,
                    study_uid,
                    series_uid,
                    study,
                    seed_key,
                    params.slice_thickness,
                )
            else:
                rel = Path("nifti") / f"case-{pat:04d}-study-{study}.nii.gz"
                write_nifti(volume, grid, out / rel, description=identity.name)
            rows.append(
                {
                    "patient_id": identity.patient_id,
                    "study_uid": study_uid,
                    "series_uid": series_uid if as_dicom else "",
                    "path": rel.as_posix(),
                    "label": covid_ct.CLASSES[label],
                }
            )
    with atomic_path(labels_csv, suffix=".csv") as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LABEL_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(manifest, wanted)  # last: only a complete dataset is ever skipped
    log.info("wrote %d studies of %d patients to %s", len(rows), cfg.n_patients, out)
    return SynthResult(out, labels_csv, cfg.n_patients, len(rows))
