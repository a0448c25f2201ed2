"""Synthetic datasets: phantoms written as real DICOM series and NIfTI, with ``labels.csv``.

Each generator module (``covid_ct``: chest CT, COVID-19 severity; ``cirrhosis_mri``: abdominal
MRI, fibrosis stage) exposes ``CLASSES`` (base), ``NOVEL_CLASSES`` (``--novel``),
``MODALITY``, ``draw(label, cfg, rng)`` for the per-study parameters and ``render(params, cfg,
rng)`` for the volume and its grid; :func:`generate` does the writing, the identities, the
label file and (``--messy``) the messy export for all of them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from medml.config import SynthConfig
from medml.io import atomic_path, atomic_write_text
from medml.progress import track
from medml.synth import cirrhosis_mri, covid_ct
from medml.synth.identity import Identity
from medml.synth.messy import EXPECTED, DicomStudy, write_messy
from medml.synth.writers import SeriesMeta, _uid, write_dicom_series, write_nifti

log = logging.getLogger(__name__)

GENERATORS: dict[str, ModuleType] = {"covid-ct": covid_ct, "cirrhosis-mri": cirrhosis_mri}
MANIFEST = "synth.json"  # config + generator version; a rerun with both unchanged writes nothing
EXPECTED_INGEST = "expected_ingest.json"  # every file's expected ingest outcome
LABEL_COLUMNS = ("patient_id", "study_uid", "series_uid", "path", "label", "class_set", "modality")


@dataclass(frozen=True)
class SynthResult:
    """What :func:`generate` wrote."""

    out: Path
    labels_csv: Path
    n_patients: int
    n_studies: int


def class_names(cfg: SynthConfig) -> tuple[str, ...]:
    """The classes ``cfg`` draws from, base classes first (novel ones with ``cfg.novel``)."""
    gen = GENERATORS[cfg.kind]
    return gen.CLASSES + (gen.NOVEL_CLASSES if cfg.novel else ())


def series_meta(cfg: SynthConfig, params) -> SeriesMeta:
    """DICOM series description of one study."""
    if cfg.kind == "cirrhosis-mri":
        return SeriesMeta(
            "MR",
            description=f"{params.weighting} {params.plane}",
            body_part="ABDOMEN",
            image_type=("ORIGINAL", "PRIMARY", "M", "ND"),
            weighting=params.weighting,
        )
    return SeriesMeta("CT", description=f"CHEST {params.slice_thickness:.1f}mm")


def generator_version() -> str:
    """Hash of the generators' source (this package): data that other code wrote for the same
    config is not this config's dataset, so a changed generator rewrites it."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def generate(cfg: SynthConfig, out: Path, progress: bool = True) -> SynthResult:
    """Write ``cfg.n_patients`` patients (some with a follow-up study) under ``out``.

    Deterministic for ``cfg.seed``: the same config writes the same voxels and UIDs, so when
    ``out`` already holds the dataset of this exact config and generator code
    (``synth.json``), nothing is rewritten; a dataset of another config (or another generator)
    written there before is replaced. Classes (base, then novel with ``cfg.novel``) are
    balanced by cycling through them; with ``format: mixed`` a random 30 % of patients are
    written as NIfTI, the rest as DICOM series. With ``cfg.messy`` a messy export is written
    around the first DICOM study. Every file's expected ingest outcome goes to
    ``expected_ingest.json``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest, labels_csv = out / MANIFEST, out / "labels.csv"
    wanted = json.dumps(
        {"config": cfg.model_dump(mode="json"), "generator": generator_version()}, sort_keys=True
    )
    if labels_csv.exists() and manifest.exists() and manifest.read_text() == wanted:
        n_studies = sum(1 for _ in labels_csv.open()) - 1
        log.info("%s already holds this synthetic dataset; nothing to write", out)
        return SynthResult(out, labels_csv, cfg.n_patients, n_studies)
    if manifest.exists():  # our own earlier output, of another config
        for sub in ("dicom", "nifti"):
            shutil.rmtree(out / sub, ignore_errors=True)
        for name in ("README.txt", EXPECTED_INGEST):
            (out / name).unlink(missing_ok=True)
    gen = GENERATORS[cfg.kind]
    classes = class_names(cfg)
    rows: list[dict[str, str]] = []
    cases: dict[str, str] = {}
    first_dicom: DicomStudy | None = None
    n_nifti = {"dicom": 0, "nifti": cfg.n_patients, "mixed": round(0.3 * cfg.n_patients)}[
        cfg.format
    ]
    nifti_patients = set(
        np.random.default_rng([cfg.seed, 2**31]).permutation(cfg.n_patients)[:n_nifti].tolist()
    )
    for pat in track(range(cfg.n_patients), "synth", enabled=progress, unit="patient"):
        rng = np.random.default_rng([cfg.seed, pat])
        identity = Identity.draw(rng)
        label = pat % len(classes)
        as_dicom = pat not in nifti_patients
        n_studies = 2 if rng.random() < cfg.followup_fraction else 1
        for study in range(1, n_studies + 1):
            params = gen.draw(label, cfg, rng)
            volume, grid = gen.render(params, cfg, rng)
            seed_key = f"{cfg.kind}-{cfg.seed}-{pat}-{study}"
            study_uid, series_uid = _uid(seed_key, "study"), _uid(seed_key, "series")
            if as_dicom:
                rel = Path("dicom") / f"case-{pat:04d}" / f"study-{study}" / "series-1"
                meta = series_meta(cfg, params)
                written = write_dicom_series(
                    volume,
                    grid,
                    out / rel,
                    identity,
                    study_uid,
                    series_uid,
                    study,
                    seed_key,
                    params.slice_thickness,
                    meta,
                )
                cases.update({p.relative_to(out).as_posix(): "clean" for p in written})
                if first_dicom is None:
                    first_dicom = DicomStudy(
                        out / rel, volume, grid, identity, study_uid, study, seed_key,
                        params.slice_thickness, meta,
                    )  # fmt: skip
            else:
                rel = Path("nifti") / f"case-{pat:04d}-study-{study}.nii.gz"
                write_nifti(volume, grid, out / rel, description=identity.name)
                cases[rel.as_posix()] = "clean"
            rows.append(
                {
                    "patient_id": identity.patient_id,
                    "study_uid": study_uid,
                    "series_uid": series_uid if as_dicom else "",
                    "path": rel.as_posix(),
                    "label": classes[label],
                    "class_set": "base" if label < len(gen.CLASSES) else "novel",
                    "modality": gen.MODALITY,
                }
            )
    if cfg.messy:
        if first_dicom is None:
            raise ValueError("--messy needs at least one DICOM study: use format dicom or mixed")
        cases.update(write_messy(out, first_dicom))
    with atomic_path(labels_csv, suffix=".csv") as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LABEL_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    for name in ("labels.csv", MANIFEST, EXPECTED_INGEST):
        cases[name] = "not-image-file"
    write_expected_ingest(out / EXPECTED_INGEST, cases)
    atomic_write_text(manifest, wanted)  # last: only a complete dataset is ever skipped
    log.info("wrote %d studies of %d patients to %s", len(rows), cfg.n_patients, out)
    return SynthResult(out, labels_csv, cfg.n_patients, len(rows))


def write_expected_ingest(path: Path, cases: dict[str, str]) -> None:
    """``{"files": {relative path: {"case", "status", "reason"}}}`` (reason: its prefix)."""
    files = {
        rel: {"case": case, "status": EXPECTED[case][0], "reason": EXPECTED[case][1]}
        for rel, case in sorted(cases.items())
    }
    doc = {
        "policy": "agreed default ingest outcomes: status, and the start of the reason",
        "files": files,
    }
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
