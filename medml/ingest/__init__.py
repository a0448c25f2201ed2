"""Ingestion: a folder tree of DICOM and NIfTI into de-identified canonical volumes + catalog.

Every file under the source gets exactly one record in the report (ingested, skipped or
quarantined, with a reason). Inputs are only ever read; outputs are written atomically; a
re-run of the same tree adds nothing and rewrites nothing, and a run killed half-way leaves
nothing that the next run does not finish or replace.

Steps: walk -> index headers and apply per-file policies -> group into series -> convert each
series (in worker processes when there is enough data, or on any other executor through
``converter``, e.g. Prefect tasks on a Dask cluster) -> catalog rows -> report.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import multiprocessing
import os
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medml.catalog import Catalog
from medml.config import IngestConfig
from medml.ingest import dicom, nifti, volumes
from medml.ingest.deid import KeyMaker, load_secret, shift_date
from medml.ingest.labels import LabelIndex
from medml.ingest.report import FileRecord, IngestReport
from medml.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    report_path: Path
    counts: dict[str, int]
    scan_ids: list[str]


# ----------------------------------------------------------------------------- walking


def walk_files(src: Path) -> list[Path]:
    """All files under ``src`` (symlinked folders are not entered, so loops cannot trap us)."""
    return walk(src)[0]


def walk(src: Path) -> tuple[list[Path], list[Path]]:
    """``(files, links_not_followed)``: regular files (and links to files) in sorted order;
    links to folders and broken links, which are listed but never entered or read."""
    found, links = [], []
    for root, dirs, files in os.walk(src, followlinks=False):
        dirs.sort()
        for d in dirs:
            if (Path(root) / d).is_symlink():
                links.append(Path(root) / d)
        for f in sorted(files):
            p = Path(root) / f
            (found if p.is_file() else links).append(p)
    return found, sorted(links)


# ----------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """One unit of conversion work: a DICOM series or a NIfTI file."""

    kind: str  # "dicom" | "nifti"
    scan_id: str | None
    series: dicom.Series | None = None
    path: Path | None = None
    label_row: dict[str, str] | None = None
    warnings: list[str] = field(default_factory=list)
    known: dict[str, Any] | None = None  # the catalog row this scan had before


@dataclass
class TaskResult:
    records: list[FileRecord]
    row: dict[str, Any] | None = None
    unchanged: bool = False


@dataclass(frozen=True)
class WorkerContext:
    """What a conversion worker needs (sent once per worker process, or with each task).

    It holds the de-identification key: send it only to workers trusted with the raw data.
    """

    src: Path
    root: Path
    volumes: Path
    keys: KeyMaker
    cfg: IngestConfig


_CTX: WorkerContext | None = None


def _init_worker(ctx: WorkerContext) -> None:
    global _CTX
    _CTX = ctx


def _rel(ctx: WorkerContext, path: Path) -> str:
    return path.relative_to(ctx.src).as_posix()


def _clean(ctx: WorkerContext, text: str) -> str:
    """Exception text without absolute source paths (they may name patients)."""
    return text.replace(str(ctx.src) + os.sep, "").replace(str(ctx.src), "")


def _policy(cfg: IngestConfig, case: str) -> str:
    if case == "burned_in" and cfg.allow_burned_in:
        return "convert"
    return {"unreadable": "quarantine", "no_pixels": "quarantine", "unsupported": "quarantine"}.get(
        case, getattr(cfg, f"on_{case}", "quarantine")
    )


# Maps conversion over tasks somewhere else (e.g. a Dask cluster); yields each task's result.
Converter = Callable[[WorkerContext, list[Task]], Iterable[tuple[Task, TaskResult]]]


def _run_task(task: Task) -> TaskResult:
    assert _CTX is not None
    return convert(_CTX, task)


def convert(ctx: WorkerContext, task: Task) -> TaskResult:
    """Convert one series or NIfTI file to its canonical volume; failures become records."""
    try:
        if task.kind == "nifti":
            return _convert_nifti(ctx, task)
        return _convert_series(ctx, task)
    except Exception as exc:  # one bad series never stops the batch
        reason = _clean(ctx, f"conversion failed: {type(exc).__name__}: {exc}")
        log.warning("%s", reason)
        return failed(ctx, task, reason)


def failed(ctx: WorkerContext, task: Task, reason: str) -> TaskResult:
    """Every file of ``task`` quarantined with ``reason``."""
    paths = task.series.paths if task.series else [task.path]
    return TaskResult([FileRecord(_rel(ctx, p), "quarantined", reason=reason) for p in paths])


def _source_hash(keys: KeyMaker, blobs: dict[Path, bytes]) -> str:
    """Keyed hash over the files' bytes (order-free): changes exactly when a file changes."""
    digests = sorted(hashlib.sha256(b).digest() for b in blobs.values())
    return hmac.new(keys._secret, b"".join(digests), hashlib.sha256).hexdigest()


def _drop_identical_duplicates(
    ctx: WorkerContext, series: dicom.Series, blobs: dict[Path, bytes]
) -> list[FileRecord]:
    """Slices at the same position with identical pixels: keep the first path, skip the rest."""
    normal = dicom.slice_normal(series.slices[0].orientation)
    by_pos: dict[float, list[dicom.Slice]] = {}
    for s in series.slices:
        by_pos.setdefault(round(float(s.position @ normal), 3), []).append(s)
    records, drop = [], set()
    for group in by_pos.values():
        if len(group) < 2 or len({s.path for s in group}) < len(group):
            continue
        group.sort(key=lambda s: str(s.path))
        for s in group:
            blobs.setdefault(s.path, s.path.read_bytes())
        kept = group[0]
        ref = dicom.pixel_digest(kept, blobs[kept.path])
        same = [s for s in group[1:] if dicom.pixel_digest(s, blobs[s.path]) == ref]
        if len(same) == len(group) - 1:
            for s in same:
                drop.add(id(s))
                records.append(
                    FileRecord(
                        _rel(ctx, s.path), "skipped", reason=f"duplicate of {_rel(ctx, kept.path)}"
                    )
                )
    series.slices = [s for s in series.slices if id(s) not in drop]
    return records


def _convert_series(ctx: WorkerContext, task: Task) -> TaskResult:
    cfg, series = ctx.cfg, task.series
    assert series is not None
    blobs: dict[Path, bytes] = {}
    records = _drop_identical_duplicates(ctx, series, blobs)
    paths = series.paths
    warnings = list(task.warnings)

    def outcome(status: str, reason: str) -> TaskResult:
        return TaskResult(
            records + [FileRecord(_rel(ctx, p), status, reason=reason) for p in paths]
        )

    if series.problem:  # the planes did not resolve into volumes: never converted
        return outcome("quarantined", series.problem.reason)
    if series.split_by:
        note = f"4D series split by {series.split_by}"
        if cfg.on_4d == "quarantine":
            return outcome(
                "quarantined",
                f"4D series ({series.n_volumes} volumes, differing by {series.split_by})",
            )
        warnings.append(note)
    allowed = set()
    for problem in dicom.check_series(series, cfg.min_slices, cfg.gap_factor, cfg.max_tilt_deg):
        action = _policy(cfg, problem.case)
        if action == "skip":
            return outcome("skipped", problem.reason)
        if action == "quarantine" or problem.case in {"duplicate_position", "single_slice"}:
            return outcome("quarantined", problem.reason)
        allowed.add(problem.case)
        warnings.append(f"converted despite {problem.reason}")
    broken = volumes.verify_stack(
        series.stack(),
        allow_gaps="missing_slice" in allowed,
        max_tilt_deg=None if "gantry_tilt" in allowed else cfg.max_tilt_deg,
    )
    if broken:
        return outcome("quarantined", broken)

    for p in paths:
        if p not in blobs:
            blobs[p] = p.read_bytes()
    source_hash = _source_hash(ctx.keys, blobs)
    h = series.first
    patient_id = str(h.get("PatientID", "") or "") or series.uid
    fields = {
        "patient_key": ctx.keys.key("patient", patient_id),
        "study_key": ctx.keys.key("study", str(h.get("StudyInstanceUID", "") or series.uid)),
        "modality": str(h.get("Modality", "") or "")[:8],
        "source_format": "dicom",
        "study_date": None
        if cfg.dates == "drop"
        else shift_date(
            str(h.get("StudyDate", "") or ""),
            ctx.keys.date_offset_days(patient_id, cfg.date_shift_max_days),
        ),
    }
    done = _finish(ctx, task, source_hash, fields, lambda: dicom.load_volume(series, blobs))
    done.records = records + [
        FileRecord(_rel(ctx, p), "ingested", scan_id=task.scan_id, warnings=warnings) for p in paths
    ]
    return done


def _convert_nifti(ctx: WorkerContext, task: Task) -> TaskResult:
    path = task.path
    assert path is not None
    rel = _rel(ctx, path)
    try:
        data, affine = nifti.load_nifti(path)
    except nifti.NiftiError as exc:
        return TaskResult([FileRecord(rel, "quarantined", reason=_clean(ctx, str(exc)))])
    blob = path.read_bytes()
    file_hash = hashlib.sha256(blob).hexdigest()
    task.scan_id = ctx.keys.key("file", file_hash)
    row = task.label_row or {}
    patient_id = row.get("patient_id") or file_hash
    fields = {
        "patient_key": ctx.keys.key("patient", patient_id),
        "study_key": ctx.keys.key("study", row.get("study_uid") or file_hash),
        "modality": (row.get("modality") or "CT")[:8],
        "source_format": "nifti",
        "study_date": None,
    }
    done = _finish(ctx, task, _source_hash(ctx.keys, {path: blob}), fields, lambda: (data, affine))
    done.records = [FileRecord(rel, "ingested", scan_id=task.scan_id)]
    return done


def _finish(ctx: WorkerContext, task: Task, source_hash: str, fields: dict, load) -> TaskResult:
    """Convert and write unless the same source bytes already produced this scan's volume."""
    volume = ctx.volumes / f"{task.scan_id}.nii.gz"
    known = task.known
    if known and known.get("source_hash") == source_hash and volume.exists():
        return TaskResult([], dict(known), unchanged=True)
    data, affine = load()
    img = nifti.to_canonical(data, affine)
    digest = nifti.content_hash(img)
    if not (known and known.get("content_hash") == digest and volume.exists()):
        nifti.save_atomic(img, volume, ctx.cfg.gzip_level)
    shape = img.shape
    row = {
        "scan_id": task.scan_id,
        **fields,
        "shape": ",".join(map(str, shape)),
        "spacing": ",".join(f"{z:.4f}" for z in img.header.get_zooms()[:3]),
        "orientation": "RAS",
        "content_hash": digest,
        "source_hash": source_hash,
        "volume": volume.relative_to(ctx.root).as_posix(),
        "n_files": len(task.series.paths) if task.series else 1,
    }
    return TaskResult([], row)


def _index_file(ctx: WorkerContext, path: Path) -> tuple:
    """``("nifti", path)``, ``("record", FileRecord)`` or ``("slice", Slice, note)``."""
    rel = _rel(ctx, path)
    if nifti.is_nifti_name(path):
        return ("nifti", path)
    try:
        header = dicom.read_header(path)
    except dicom.InvalidDicomError:
        if dicom.has_dicom_name(path):
            what = "empty file" if path.stat().st_size == 0 else "no DICOM preamble or tags"
            return ("record", FileRecord(rel, "quarantined", reason=f"unreadable DICOM: {what}"))
        return ("record", FileRecord(rel, "skipped", reason="not DICOM or NIfTI"))
    except Exception as exc:  # truncated or corrupt: pydicom raises many types
        reason = _clean(ctx, f"unreadable DICOM: {type(exc).__name__}: {exc}")
        return ("record", FileRecord(rel, "quarantined", reason=reason))
    try:
        problem = dicom.classify(header)
        note = None
        if problem:
            action = _policy(ctx.cfg, problem.case)
            if action != "convert":
                status = "skipped" if action == "skip" else "quarantined"
                return ("record", FileRecord(rel, status, reason=_clean(ctx, problem.reason)))
            note = problem.reason
        return ("slice", dicom.Slice(path, dicom.compact_header(header)), note)
    except Exception as exc:  # malformed values (bad VR, unparsable numbers)
        reason = _clean(ctx, f"unreadable DICOM: {type(exc).__name__}: {exc}")
        return ("record", FileRecord(rel, "quarantined", reason=reason))


def _index_chunk(paths: list[Path]) -> list[tuple]:
    assert _CTX is not None
    return [_index_file(_CTX, p) for p in paths]


# ----------------------------------------------------------------------------- the run


class _Ingestor:
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
        files, links = walk(self.src)
        self.report.links_not_followed = [self.rel(p) for p in links]
        n = self.workers(files)
        pool = None
        if n > 1:  # spawn: fork is unsafe in threaded callers (Prefect, MLflow)
            pool = ProcessPoolExecutor(
                n, multiprocessing.get_context("spawn"), initializer=_init_worker,
                initargs=(self.ctx,),
            )  # fmt: skip
        else:
            _init_worker(self.ctx)
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
        results = pool.map(_index_chunk, chunks) if pool else map(_index_chunk, chunks)
        with tqdm(total=len(files), desc="index", unit="file", disable=not progress) as bar:
            for part in results:
                for item in part:
                    if item[0] == "nifti":
                        tasks.append(Task("nifti", None, path=item[1]))
                    elif item[0] == "record":
                        self.records.append(item[1])
                    else:
                        slices.append(item[1])
                        if item[2]:
                            notes[item[1].path] = item[2]
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
        """Processes to use: ``cfg.workers``, or one per CPU when there is enough data."""
        if self.cfg.workers:
            return self.cfg.workers
        total_mb = sum(p.stat().st_size for p in files) / 2**20
        if total_mb < self.cfg.parallel_min_mb:
            return 1
        return max(1, os.cpu_count() or 1)

    def execute(
        self,
        tasks: list[Task],
        known: dict[str, dict],
        pool: ProcessPoolExecutor | None,
        progress: bool,
    ) -> None:
        counts = {"ingested": 0, "skipped": 0, "quarantined": 0}
        bar = tqdm(total=len(tasks), desc="convert", unit="scan", disable=not progress)

        def collect(result: TaskResult, task: Task) -> None:
            self.records.extend(result.records)
            for r in result.records:
                counts[r.status] += 1
            if result.row is not None:
                self.store(result.row, task, known)
            bar.update(1)
            bar.set_postfix(counts, refresh=False)

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
                collect(_run_task(t), t)
        else:
            futures = {pool.submit(_run_task, t): t for t in tasks}
            for fut in as_completed(futures):
                t = futures[fut]
                try:
                    result = fut.result()
                except Exception as exc:  # a worker died (out of memory, killed)
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
        self.catalog.dispose()
        scan_ids = sorted({r.scan_id for r in self.report.files if r.scan_id})
        return IngestResult(report_path, counts, scan_ids)


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
    result = _Ingestor(src, ws, labels, cfg, converter).run(progress)
    log.info("ingest: %s", result.counts)
    return result
