"""Ingestion: a folder tree of DICOM and NIfTI into de-identified canonical volumes + catalog.

Every file under the source gets a record in the report (ingested, skipped or quarantined,
with a reason). Inputs are only ever read; outputs are written atomically; a re-run of the
same tree adds nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from medml.catalog import Catalog
from medml.config import IngestConfig
from medml.ingest import dicom, nifti
from medml.ingest.deid import KeyMaker, load_secret
from medml.ingest.labels import LabelIndex
from medml.ingest.report import FileRecord, IngestReport
from medml.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    report_path: Path
    counts: dict[str, int]
    scan_ids: list[str]


def walk_files(src: Path) -> list[Path]:
    """All regular files under ``src`` (symlinks are not followed, so loops cannot trap us)."""
    found = []
    for root, dirs, files in os.walk(src, followlinks=False):
        dirs.sort()
        found.extend(Path(root) / f for f in sorted(files))
    return found


class _Ingestor:
    def __init__(self, src: Path, ws: Workspace, labels: LabelIndex, cfg: IngestConfig) -> None:
        self.src, self.ws, self.labels, self.cfg = src, ws.ensure(), labels, cfg
        self.keys = KeyMaker(load_secret(ws.secret_file))
        self.catalog = Catalog(ws.catalog_url)
        self.report = IngestReport(source=str(src))
        self.run_id = self.keys.key("run", self.report.started + str(src), 12)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.src).as_posix()

    def add(self, path: Path, status: str, **kw) -> None:
        self.report.files.append(FileRecord(self.rel(path), status, **kw))

    def run(self, progress: bool) -> IngestResult:
        files = walk_files(self.src)
        dicom_slices: list[dicom.Slice] = []
        for path in tqdm(files, desc="index", unit="file", disable=not progress):
            self.index_file(path, dicom_slices)
        series = dicom.group_series(dicom_slices)
        for s in tqdm(series, desc="convert", unit="series", disable=not progress):
            self.convert_series(s)
        report_path = self.report.write(self.ws.reports)
        quarantined = [
            {"path": r.path, "reason": r.reason}
            for r in self.report.files
            if r.status == "quarantined"
        ]
        counts = self.report.counts()
        self.catalog.record_run(
            {
                "run_id": self.run_id,
                "source": str(self.src),
                "started": self.report.started,
                "finished": self.report.finished,
                "report": str(report_path),
                "n_files": counts["files"],
                "n_scans": counts["scans"],
            },
            quarantined,
        )
        scan_ids = sorted({r.scan_id for r in self.report.files if r.scan_id})
        return IngestResult(report_path, counts, scan_ids)

    def index_file(self, path: Path, dicom_slices: list[dicom.Slice]) -> None:
        if nifti.is_nifti_name(path):
            self.ingest_nifti(path)
            return
        try:
            header = dicom.read_header(path)
        except dicom.InvalidDicomError:
            self.add(path, "skipped", reason="not DICOM or NIfTI")
            return
        except Exception as exc:  # truncated or corrupt: pydicom raises many types
            self.add(path, "quarantined", reason=f"unreadable DICOM: {type(exc).__name__}: {exc}")
            return
        problem = dicom.image_problem(header)
        if problem:
            self.add(path, "quarantined", reason=problem)
        elif (
            str(header.get("BurnedInAnnotation", "NO")).upper() == "YES"
            and not self.cfg.allow_burned_in
        ):
            self.add(
                path, "quarantined", reason="BurnedInAnnotation YES (identity may be in pixels)"
            )
        else:
            dicom_slices.append(dicom.Slice(path, header))

    def convert_series(self, series: dicom.Series) -> None:
        try:
            dicom.sort_and_check(series, self.cfg.min_slices)
            data, affine = dicom.load_volume(series)
        except Exception as exc:
            reason = (
                str(exc)
                if isinstance(exc, dicom.SeriesError)
                else f"conversion failed: {type(exc).__name__}: {exc}"
            )
            for s in series.slices:
                self.add(s.path, "quarantined", reason=reason)
            return
        h = series.first
        folder = self.rel(series.slices[0].path.parent)
        row = self.labels.find(
            series_uid=str(h.SeriesInstanceUID),
            path=folder,
            study_uid=str(h.get("StudyInstanceUID", "")),
            patient_id=str(h.get("PatientID", "")),
        )
        scan_id = self.keys.key("series", series.uid)
        self.store(
            scan_id,
            data,
            affine,
            row,
            source_format="dicom",
            modality=str(h.get("Modality", "")),
            patient=self.keys.key("patient", str(h.get("PatientID", "")) or series.uid),
            study=self.keys.key("study", str(h.get("StudyInstanceUID", series.uid))),
        )
        for s in series.slices:
            self.add(s.path, "ingested", scan_id=scan_id)

    def ingest_nifti(self, path: Path) -> None:
        try:
            data, affine = nifti.load_nifti(path)
        except nifti.NiftiError as exc:
            self.add(path, "quarantined", reason=str(exc))
            return
        file_hash = hashlib.sha256(path.read_bytes()).hexdigest()
        row = self.labels.find(path=self.rel(path))
        patient_id = (row or {}).get("patient_id") or file_hash
        study_uid = (row or {}).get("study_uid") or file_hash
        scan_id = self.keys.key("file", file_hash)
        modality = (row or {}).get("modality") or "CT"
        self.store(
            scan_id,
            data,
            affine,
            row,
            source_format="nifti",
            modality=modality,
            patient=self.keys.key("patient", patient_id),
            study=self.keys.key("study", study_uid),
        )
        self.add(path, "ingested", scan_id=scan_id)

    def store(
        self,
        scan_id: str,
        data: np.ndarray,
        affine: np.ndarray,
        row: dict | None,
        source_format: str,
        modality: str,
        patient: str,
        study: str,
    ) -> None:
        img = nifti.to_canonical(data, affine)
        canon = np.asarray(img.dataobj)
        content_hash = hashlib.sha256(
            canon.tobytes() + np.round(img.affine, 4).tobytes()
        ).hexdigest()
        volume = self.ws.volume_path(scan_id)
        existing = self.catalog.get_scan(scan_id)
        if not (existing and existing["content_hash"] == content_hash and volume.exists()):
            nifti.save_atomic(img, volume)
        label = (row or {}).get("label") or None
        self.catalog.upsert_scan(
            {
                "scan_id": scan_id,
                "patient_key": patient,
                "study_key": study,
                "modality": modality,
                "shape": ",".join(map(str, canon.shape)),
                "spacing": ",".join(f"{z:.4f}" for z in img.header.get_zooms()[:3]),
                "orientation": "RAS",
                "source_format": source_format,
                "content_hash": content_hash,
                "label": label,
                "class_set": (row or {}).get("class_set") or "base",
                "split": existing["split"] if existing and existing["label"] == label else None,
                "volume": volume.relative_to(self.ws.root).as_posix(),
                "ingest_run": self.run_id,
            }
        )


def ingest(
    src: str | Path,
    ws: Workspace,
    labels_csv: str | Path | None = None,
    cfg: IngestConfig | None = None,
    progress: bool = True,
) -> IngestResult:
    """Ingest every file under ``src`` into ``ws``; return the report path and counts."""
    src = Path(src).resolve()
    if not src.is_dir():
        raise FileNotFoundError(f"ingest source is not a folder: {src}")
    labels = LabelIndex.from_csv(Path(labels_csv) if labels_csv else None)
    result = _Ingestor(src, ws, labels, cfg or IngestConfig()).run(progress)
    log.info("ingest %s: %s", src, result.counts)
    return result
