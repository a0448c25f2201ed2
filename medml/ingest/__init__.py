"""Ingestion: a folder tree of DICOM and NIfTI into de-identified canonical volumes + catalog.

Every file under the source gets exactly one record in the report (ingested, skipped or
quarantined, with a reason). Inputs are only ever read; outputs are written atomically; a
re-run of the same tree adds nothing and rewrites nothing, and a run killed half-way leaves
nothing that the next run does not finish or replace.

Steps: walk (:mod:`.walk`) -> index headers and apply per-file policies (:mod:`.checks`) ->
group into series and volumes (:mod:`.dicom`, :mod:`.volumes`, :mod:`.mosaic`) -> convert each
series (:mod:`.conversion`; in worker processes when there is enough data, or on any other
executor through ``converter``) -> catalog rows -> report (:mod:`.run`).
"""

from __future__ import annotations

from medml.ingest.checks import SeriesChecks, Verdict
from medml.ingest.conversion import (
    Converter,
    Task,
    TaskResult,
    WorkerContext,
    convert,
    failed,
)
from medml.ingest.run import Ingestor, IngestResult, ingest, merge_records
from medml.ingest.walk import walk, walk_files

__all__ = [
    "Converter",
    "IngestResult",
    "Ingestor",
    "SeriesChecks",
    "Task",
    "TaskResult",
    "Verdict",
    "WorkerContext",
    "convert",
    "failed",
    "ingest",
    "merge_records",
    "walk",
    "walk_files",
]
