"""One ingest run: walk the source, index headers, group series, convert, catalog, report."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medml.catalog import Catalog
from medml.config import IngestConfig
from medml.ingest import dicom
from medml.ingest.conversion import (
    Converter,
    IndexedNifti,
    IndexedRecord,
    Task,
    TaskResult,
    WorkerContext,
    failed,
    index_chunk,
    init_worker,
    run_task,
)
from medml.ingest.deid import KeyMaker, load_secret
from medml.ingest.faults import raise_if_environment
from medml.ingest.labels import LabelIndex
from medml.ingest.report import FileRecord, IngestReport, printable, quarantine_entries
from medml.ingest.walk import walk_tree
from medml.lock import workspace_lock
from medml.processes import cap_workers
from medml.progress import Progress
from medml.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    report_path: Path
    counts: dict[str, int]
    scan_ids: list[str]


class Ingestor:
    """One ingest run: walk, index, group, convert, catalog, report."""

    def __init__(
        self,
        src: Path,
        ws: Workspace,
        labels: LabelIndex,
        cfg: IngestConfig,
        converter: Converter | None = None,
    ) -> None:
        self.src, self.ws, self.labels, self.cfg = src, ws.ensure(), labels, cfg
        self.converter = converter
        self.keys = KeyMaker(load_secret(ws.secret_file))
        self.catalog = Catalog(ws.catalog_url)
        self.report = IngestReport(source=str(src))
        self.run_id = uuid.uuid4().hex[:12]
        self.ctx = WorkerContext(src, ws.root, ws.volumes, self.keys, cfg)
        self.records: list[FileRecord] = []
        self.pending: list[dict[str, Any]] = []
        self.flushed = time.monotonic()

    def rel(self, path: Path) -> str:
        return path.relative_to(self.src).as_posix()

    def add(self, path: Path, status: str, **kw) -> None:
        self.records.append(FileRecord(self.rel(path), status, **kw))

    def clean_stale_temporaries(self) -> None:
        """Temp files a killed run left behind (``atomic_path`` names start with a dot)."""
        for folder, pattern in ((self.ws.volumes, ".*.nii.gz.*"), (self.ws.reports, ".ingest-*")):
            for p in folder.glob(pattern):
                p.unlink(missing_ok=True)

    def run(self, progress: bool) -> IngestResult:
        self.clean_stale_temporaries()
        tree = walk_tree(self.src)
        files = tree.files
        self.report.links_not_followed = [self.rel(p) for p in tree.links]
        self.report.special_files = [self.rel(p) for p in tree.special]
        self.report.unreadable_folders = [self.rel(p) for p in tree.unreadable]
        for folder in tree.unreadable:
            log.warning("ingest: folder %s could not be listed", self.rel(folder))
        n = self.workers(files)
        pool = None
        if n > 1:  # spawn: fork is unsafe in threaded callers (Prefect, MLflow)
            pool = ProcessPoolExecutor(
                n, multiprocessing.get_context("spawn"), initializer=init_worker,
                initargs=(self.ctx,),
            )  # fmt: skip
        else:
            init_worker(self.ctx)
        try:
            slices, notes, tasks = self.index(files, pool, progress)
            known = self.catalog.scans_by_id()
            for series in dicom.group_series(slices):
                tasks.append(self.series_task(series, notes, known))
            for t in tasks:
                if t.kind == "nifti":
                    t.label_row = self.labels.find(path=self.rel(t.path))
            self.execute(tasks, known, pool, progress)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        return self.finish()

    def index(
        self, files: list[Path], pool: ProcessPoolExecutor | None, progress: bool
    ) -> tuple[list[dicom.Slice], dict[Path, str], list[Task]]:
        """Read every header once (in the workers when there are some), apply file policies."""
        slices: list[dicom.Slice] = []
        notes: dict[Path, str] = {}
        tasks: list[Task] = []
        chunk = 64
        chunks = [files[i : i + chunk] for i in range(0, len(files), chunk)]
        results = pool.map(index_chunk, chunks) if pool else map(index_chunk, chunks)
        with Progress(len(files), "index", enabled=progress, unit="file") as bar:
            for part in results:
                for item in part:
                    if isinstance(item, IndexedNifti):
                        tasks.append(Task("nifti", None, path=item.path))
                    elif isinstance(item, IndexedRecord):
                        self.records.append(item.record)
                    else:
                        slices.append(item.slice)
                        if item.note:
                            notes[item.slice.path] = item.note
                bar.update(len(part))
        return slices, notes, tasks

    def series_task(
        self, series: dicom.Series, notes: dict[Path, str], known: dict[str, dict]
    ) -> Task:
        h = series.first
        row = self.labels.find(
            series_uid=str(h.SeriesInstanceUID),
            path=self.rel(series.slices[0].path),
            study_uid=str(h.get("StudyInstanceUID", "")),
            patient_id=str(h.get("PatientID", "")),
        )
        warnings = sorted({f"converted despite {notes[p]}" for p in series.paths if p in notes})
        scan_id = self.keys.key("series", series.uid)
        return Task("dicom", scan_id, series=series, label_row=row, warnings=warnings,
                    known=known.get(scan_id))  # fmt: skip

    def workers(self, files: list[Path]) -> int:
        """Processes to use: ``cfg.workers``, or :func:`auto_workers`."""
        if self.cfg.workers:
            return cap_workers(self.cfg.workers, "ingest.workers")
        total_mb = sum(p.stat().st_size for p in files) / 2**20
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        cpus = os.cpu_count() or 1
        n = auto_workers(total_mb, self.cfg.parallel_min_mb, cpus, load)
        log.info("ingest: %.0f MB of input, %d process(es)", total_mb, n)
        return n

    def execute(
        self,
        tasks: list[Task],
        known: dict[str, dict],
        pool: ProcessPoolExecutor | None,
        progress: bool,
    ) -> None:
        counts = {"ingested": 0, "skipped": 0, "quarantined": 0}
        bar = Progress(len(tasks), "convert", enabled=progress)

        def collect(result: TaskResult, task: Task) -> None:
            self.records.extend(result.records)
            for r in result.records:
                counts[r.status] += 1
            if result.row is not None:
                self.store(result.row, task, known)
            bar.set_postfix(**counts)
            bar.update(1)

        for t in tasks:  # NIfTI scan ids come from the file hash, so look them up by it
            if t.kind == "nifti":
                t.known = self._known_nifti(t, known)
        # largest first, so one big series does not finish alone at the end
        tasks.sort(key=lambda t: -(len(t.series.slices) if t.series else 1))
        if self.converter is not None:
            for t, result in self.converter(self.ctx, tasks):
                collect(result, t)
        elif pool is None:
            for t in tasks:
                collect(run_task(t), t)
        else:
            futures = {pool.submit(run_task, t): t for t in tasks}
            for fut in as_completed(futures):
                t = futures[fut]
                try:
                    result = fut.result()
                except Exception as exc:  # a worker died (out of memory, killed)
                    raise_if_environment(exc, self.ws.root)
                    reason = f"conversion failed: worker died: {type(exc).__name__}"
                    result = failed(self.ctx, t, reason)
                collect(result, t)
        bar.close()

    def _known_nifti(self, task: Task, known: dict[str, dict]) -> dict | None:
        """NIfTI scan ids come from the file hash; hashing here lets workers skip unchanged ones."""
        try:
            digest = hashlib.sha256(task.path.read_bytes()).hexdigest()
        except OSError:
            return None
        return known.get(self.keys.key("file", digest))

    def store(self, row: dict[str, Any], task: Task | None, known: dict[str, dict]) -> None:
        label_row = (task.label_row if task else None) or {}
        label = label_row.get("label") or None
        existing = known.get(row["scan_id"])
        row = dict(row)
        row["label"] = label
        row["class_set"] = label_row.get("class_set") or "base"
        row["split"] = existing["split"] if existing and existing["label"] == label else None
        row["ingest_run"] = self.run_id
        self.pending.append(row)
        if time.monotonic() - self.flushed > self.cfg.commit_every_s:
            self.flush()

    def flush(self) -> None:
        """Commit pending catalog rows in one transaction.

        Rows lost to a crash are harmless: their volumes are on disk under their final names
        and the next run, finding no row, converts again to the same bytes.
        """
        self.catalog.upsert_scans(self.pending)
        self.pending = []
        self.flushed = time.monotonic()

    def finish(self) -> IngestResult:
        self.flush()
        self.report.files = merge_records(self.records)
        report_path = self.report.write(self.ws.reports)
        counts = self.report.counts()
        self.catalog.record_run(  # no source path: the report is the one place for them
            {
                "run_id": self.run_id,
                "source": self.keys.key("source", printable(str(self.src.resolve()))),
                "started": self.report.started,
                "finished": self.report.finished,
                "report": str(report_path),
                "n_files": counts["files"],
                "n_scans": counts["scans"],
            },
            quarantine_entries(self.report.files),
        )
        self.catalog.dispose()
        scan_ids = sorted({r.scan_id for r in self.report.files if r.scan_id})
        return IngestResult(report_path, counts, scan_ids)


def auto_workers(total_mb: float, min_mb: float, cpus: int, load: float) -> int:
    """Processes for ``ingest.workers: 0``: one per idle CPU, where the input is large enough.

    A spawned worker spends ~0.6 s CPU importing before it works, and shipping series and
    results between processes costs more again (12 x 100 CT slices, 600 MB: 3.8 s CPU in one
    process, 5.9 s with two workers); so below ``min_mb`` of input, and on a machine whose
    CPUs are busy (the 1-minute load average, this process included), the work stays here.
    Any number of processes gives the same result.
    """
    if total_mb < min_mb:
        return 1
    idle = int(cpus - max(load - 1.0, 0.0) + 0.5)
    return max(1, min(cpus, idle))


def merge_records(records: list[FileRecord]) -> list[FileRecord]:
    """One record per path: a multi-frame file split into several scans is reported once."""
    rank = {"ingested": 0, "quarantined": 1, "skipped": 2}
    by_path: dict[str, FileRecord] = {}
    for r in records:
        old = by_path.get(r.path)
        if old is None or rank[r.status] < rank[old.status]:
            by_path[r.path] = r
        elif old.status == r.status == "ingested" and old.scan_id != r.scan_id:
            old.warnings = [*old.warnings, f"also in scan {r.scan_id}"]
    return sorted(by_path.values(), key=lambda r: r.path)


def ingest(
    src: str | Path,
    ws: Workspace,
    labels_csv: str | Path | None = None,
    cfg: IngestConfig | None = None,
    progress: bool = True,
    converter: Converter | None = None,
) -> IngestResult:
    """Ingest every file under ``src`` into ``ws``; return the report path and counts.

    Headers are indexed here (in local worker processes when there is enough data); series
    conversion runs in the same processes, or through ``converter`` when one is given.
    """
    cfg = cfg or IngestConfig()
    src = Path(src).resolve()
    if not src.is_dir():
        raise FileNotFoundError(f"ingest source is not a folder: {src}")
    if labels_csv:
        labels = LabelIndex.from_csv(Path(labels_csv))
        labels.folders = cfg.folder_labels
    else:
        labels = LabelIndex.from_folders() if cfg.folder_labels else LabelIndex.from_csv(None)
    with workspace_lock(ws.root, "ingest", catalog_url=ws.catalog_url):
        result = Ingestor(src, ws, labels, cfg, converter).run(progress)
    log.info("ingest: %s", result.counts)
    return result
