"""Conversion: one DICOM series or NIfTI file to its canonical volume and catalog row.

Runs in the ingesting process, in its worker processes, or on any executor that maps
:func:`convert` over tasks (a :data:`Converter`, e.g. Prefect tasks on a Dask cluster). Failures
become report records; one bad series never stops the batch.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from medml.config import IngestConfig
from medml.ingest import budget, dicom, nifti
from medml.ingest.checks import SeriesChecks
from medml.ingest.deid import KeyMaker, shift_date
from medml.ingest.faults import raise_if_environment, scrub
from medml.ingest.report import FileRecord
from medml.processes import die_with_parent

log = logging.getLogger(__name__)


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

    @cached_property
    def checks(self) -> SeriesChecks:
        return SeriesChecks.from_config(self.cfg)


_CTX: WorkerContext | None = None


def init_worker(ctx: WorkerContext) -> None:
    """Give this process the context its conversions use."""
    global _CTX
    die_with_parent()  # a killed ingest takes its workers with it
    _CTX = ctx


def _rel(ctx: WorkerContext, path: Path) -> str:
    return path.relative_to(ctx.src).as_posix()


def _clean(ctx: WorkerContext, text: str) -> str:
    """Exception text without absolute source paths or quoted header values (they may name
    patients)."""
    return scrub(text.replace(str(ctx.src) + os.sep, "").replace(str(ctx.src), ""))


# Maps conversion over tasks somewhere else (e.g. a Dask cluster); yields each task's result.
Converter = Callable[[WorkerContext, list[Task]], Iterable[tuple[Task, TaskResult]]]


def run_task(task: Task) -> TaskResult:
    """:func:`convert` in a worker (after :func:`init_worker`)."""
    assert _CTX is not None
    return convert(_CTX, task)


def convert(ctx: WorkerContext, task: Task) -> TaskResult:
    """Convert one series or NIfTI file to its canonical volume; failures become records."""
    try:
        if task.kind == "nifti":
            return _convert_nifti(ctx, task)
        return _convert_series(ctx, task)
    except Exception as exc:  # one bad series never stops the batch
        raise_if_environment(exc, ctx.root)  # ...but a full or unwritable workspace does
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

    verdict = ctx.checks.judge(series)
    if verdict.action != "convert":
        status = "skipped" if verdict.action == "skip" else "quarantined"
        return outcome(status, verdict.reason)
    warnings += verdict.warnings
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
        data, affine = nifti.load_nifti(path, ctx.cfg.max_voxels)
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


@dataclass(frozen=True)
class IndexedNifti:
    """A NIfTI file: converted on its own."""

    path: Path


@dataclass(frozen=True)
class IndexedRecord:
    """A file that is already decided (skipped or quarantined)."""

    record: FileRecord


@dataclass(frozen=True)
class IndexedSlice:
    """A DICOM image file, and the policy case it is converted despite, if any."""

    slice: dicom.Slice
    note: str | None = None


Indexed = IndexedNifti | IndexedRecord | IndexedSlice


def index_file(ctx: WorkerContext, path: Path) -> Indexed:
    """Read one file's header once and apply the per-file policies."""
    rel = _rel(ctx, path)
    if nifti.is_nifti_name(path):
        return IndexedNifti(path)
    try:
        header = dicom.index_header(path, ctx.cfg.max_voxels)
    except budget.BudgetError as exc:  # a deflated file inflating past its budget
        return IndexedRecord(FileRecord(rel, "quarantined", reason=_clean(ctx, str(exc))))
    except dicom.InvalidDicomError:
        if dicom.has_dicom_name(path):
            what = "empty file" if path.stat().st_size == 0 else "no DICOM preamble or tags"
            return IndexedRecord(FileRecord(rel, "quarantined", reason=f"unreadable DICOM: {what}"))
        return IndexedRecord(FileRecord(rel, "skipped", reason="not DICOM or NIfTI"))
    except Exception as exc:  # truncated or corrupt: pydicom raises many types
        reason = _clean(ctx, f"unreadable DICOM: {type(exc).__name__}: {exc}")
        return IndexedRecord(FileRecord(rel, "quarantined", reason=reason))
    try:
        problem = dicom.classify(header, ctx.cfg.max_voxels)
        note = None
        if problem:
            action = ctx.checks.action(problem.case)
            if action != "convert":
                status = "skipped" if action == "skip" else "quarantined"
                return IndexedRecord(FileRecord(rel, status, reason=_clean(ctx, problem.reason)))
            note = problem.reason
        return IndexedSlice(dicom.Slice(path, dicom.compact_header(header)), note)
    except Exception as exc:  # malformed values (bad VR, unparsable numbers)
        reason = _clean(ctx, f"unreadable DICOM: {type(exc).__name__}: {exc}")
        return IndexedRecord(FileRecord(rel, "quarantined", reason=reason))


def index_chunk(paths: list[Path]) -> list[Indexed]:
    """:func:`index_file` over ``paths`` in a worker (after :func:`init_worker`)."""
    assert _CTX is not None
    return [index_file(_CTX, p) for p in paths]
