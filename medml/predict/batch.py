"""Batch inference: many scans through a registered model, one output row per input.

Streams: each batch is embedded, classified and appended to the output files while worker
processes read and preprocess the next few (``medml.predict.prefetch``), so memory does not
grow with the number of scans. Idempotent: a ledger next
to the output (``<out>.ledger.jsonl``) records, per model (MLflow model uuid) and input
fingerprint (path, size, mtime; hashed, so no path is stored), the row already predicted; a
re-run with the same model re-emits those rows without reading the scans again. Error rows are
never recorded, so a fixed input is retried.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from medml.ingest.nifti import is_nifti_name
from medml.io import atomic_path, jsonable, remove_stale_temporaries
from medml.predict.prefetch import Prefetcher, auto_workers
from medml.predict.pyfunc import MedmlModel, prob_column


@dataclass(frozen=True)
class PredictionSummary:
    out: Path
    n_inputs: int
    n_errors: int
    seconds: float
    counts: dict[str, int]
    n_skipped: int = 0  # already predicted by this model (from the ledger)
    files: list[Path] = field(default_factory=list)  # every output written

    @property
    def scans_per_s(self) -> float:
        return self.n_inputs / self.seconds if self.seconds > 0 else float("nan")


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


def fingerprint(path: str, scan_id: str | None = None) -> str:
    """Hash of an input's path, sizes and modification times (a folder: of its files)."""
    h = hashlib.sha256(str(Path(path).resolve()).encode())
    h.update(str(scan_id or "").encode())
    p = Path(path)
    entries = sorted(q for q in p.iterdir() if q.is_file()) if p.is_dir() else [p]
    for q in entries:
        try:
            st = q.stat()
            h.update(f"{q.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"{q.name}:missing".encode())
    return h.hexdigest()


def ledger_path(out: Path) -> Path:
    return Path(out).with_name(Path(out).stem + ".ledger.jsonl")


def _read_ledger(path: Path, model_id: str) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a torn last line from a crash
                entry = json.loads(line)
                if entry.get("model") == model_id:
                    done[entry["key"]] = entry["row"]
    return done


def arrow_schema(classes: list[str]) -> pa.Schema:
    """Fixed output schema, so batches of only error rows append to the same Parquet file."""
    return pa.schema(
        [
            ("scan_id", pa.string()),
            ("predicted_class", pa.string()),
            ("similarity", pa.float64()),
            ("margin", pa.float64()),
        ]
        + [(prob_column(c), pa.float64()) for c in classes]
        + [("unknown", pa.bool_()), ("nearest_support", pa.string()), ("error", pa.string())]
    )


class _Writers:
    """Append batches to a CSV and/or a Parquet file; both renamed into place at the end."""

    def __init__(self, stack: contextlib.ExitStack, paths: dict[str, Path], schema: pa.Schema):
        self.tmp = {
            fmt: stack.enter_context(atomic_path(p, suffix=p.suffix)) for fmt, p in paths.items()
        }
        self.schema = schema
        self.header = True
        self.parquet: pq.ParquetWriter | None = None
        if "parquet" in self.tmp:
            self.parquet = stack.enter_context(pq.ParquetWriter(self.tmp["parquet"], schema))
        if "csv" in self.tmp:
            self.tmp["csv"].write_text("")

    def write(self, frame: pd.DataFrame) -> None:
        if "csv" in self.tmp:
            frame.to_csv(self.tmp["csv"], mode="a", header=self.header, index=False)
            self.header = False
        if self.parquet is not None:
            clean = frame.astype(object).where(frame.notna(), None)
            self.parquet.write_table(pa.Table.from_pandas(clean, self.schema, preserve_index=False))


def _batches(frame: pd.DataFrame, size: int) -> Iterator[pd.DataFrame]:
    for i in range(0, len(frame), size):
        yield frame.iloc[i : i + size].reset_index(drop=True)


def predict_frame(
    model_uri: str,
    frame: pd.DataFrame,
    out: Path,
    batch_size: int = 8,
    progress: bool = True,
    formats: Sequence[str] | None = None,
    ledger: bool = True,
    explain: Path | None = None,
    workers: int | None = None,
) -> PredictionSummary:
    """Predict each row of ``frame`` (``path``, optional ``scan_id``) into ``out``.

    ``formats`` (``csv``/``parquet``) write ``out`` with each suffix; by default only ``out``
    as named. ``explain`` writes a saliency PNG per predicted scan into that folder.
    ``workers`` processes read and preprocess the next batches while one is embedded (None:
    the model's ``predict.workers`` setting, where None means one per CPU for large inputs).
    """
    start = time.perf_counter()
    out = Path(out)
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    model: MedmlModel = pyfunc.unwrap_python_model()
    model_id = pyfunc.metadata.model_uuid or model_uri
    if formats is None:
        formats = ["parquet" if out.suffix == ".parquet" else "csv"]
    paths = {fmt: out.with_suffix(f".{fmt}") for fmt in formats}
    # hidden temporaries of a predict killed mid-write (their writer is dead)
    remove_stale_temporaries(out.parent, [p.name for p in paths.values()])
    book = ledger_path(out)
    done = _read_ledger(book, model_id) if ledger else {}
    given = frame["scan_id"] if "scan_id" in frame.columns else pd.Series([None] * len(frame))
    keys = [
        fingerprint(str(p), g if isinstance(g, str) else None) for p, g in zip(frame["path"], given)
    ]
    frame = frame.assign(_key=keys)
    counts: Counter[str] = Counter()
    n_err = n_skip = 0
    bar = tqdm(total=len(frame), desc="predict", unit="scan", disable=not progress)
    batches = list(_batches(frame, batch_size))
    done_masks = [b["_key"].isin(done).to_numpy() for b in batches]
    todo_paths = [[str(p) for p in b.loc[~m, "path"]] for b, m in zip(batches, done_masks)]
    pc = model.settings.predict
    n_workers = auto_workers(
        sum(map(len, todo_paths)), pc.workers if workers is None else workers, pc.parallel_min
    )
    with contextlib.ExitStack() as stack:
        writers = _Writers(stack, paths, arrow_schema(model.prototypes.classes))
        ledger_fh = stack.enter_context(book.open("a")) if ledger else None
        prefetch = stack.enter_context(Prefetcher(model.settings.preprocess, n_workers))
        for batch, cached, prepared in zip(batches, done_masks, prefetch.map(todo_paths)):
            parts = []
            if cached.any():
                rows_done = pd.DataFrame([done[k] for k in batch.loc[cached, "_key"]])
                parts.append(rows_done.set_axis(np.flatnonzero(cached)))
                n_skip += int(cached.sum())
            todo = batch[~cached].reset_index(drop=True)
            if len(todo):
                vols, ids, errors = prepared
                if "scan_id" in todo.columns:
                    ids = [
                        g if isinstance(g, str) and g else own
                        for g, own in zip(todo["scan_id"], ids)
                    ]
                rows, neighbours = model.rows(model.embed_volumes(vols), ids, errors)
                parts.append(rows.set_axis(np.flatnonzero(~cached)))
                ok = [i for i, e in enumerate(errors) if e is None]
                if explain is not None:
                    _explain(model, rows, vols, neighbours, ok, Path(explain))
                if ledger_fh is not None:  # error rows are never recorded: they are retried
                    _record(ledger_fh, model_id, todo["_key"], rows, ok)
            result = pd.concat(parts).sort_index()  # input order
            result = result.reindex(columns=list(writers.schema.names))
            writers.write(result)
            n_err += int(result["error"].notna().sum())
            counts.update(result["predicted_class"].dropna().tolist())
            bar.update(len(batch))
        if writers.header:  # no inputs: still a valid, empty table
            writers.write(pd.DataFrame(columns=list(writers.schema.names)))
        bar.close()
    seconds = time.perf_counter() - start
    return PredictionSummary(
        out.with_suffix(f".{formats[0]}"),
        len(frame),
        n_err,
        seconds,
        dict(counts),
        n_skip,
        list(paths.values()),
    )


def _explain(
    model: MedmlModel,
    rows: pd.DataFrame,
    vols: list,
    neighbours: list[list[int]],
    ok: list[int],
    folder: Path,
) -> None:
    """A saliency PNG per predicted row (``ok``: the rows without an error)."""
    from medml.predict.explain import write_explanation

    for i in ok:
        row = rows.iloc[i]
        write_explanation(
            model, vols[i], row["scan_id"], row["predicted_class"], neighbours[i], folder
        )


def _record(fh: TextIO, model_id: str, keys: pd.Series, rows: pd.DataFrame, ok: list[int]) -> None:
    """Append the predicted rows to the ledger, durably (flushed and fsynced)."""
    for i in ok:
        record = {"model": model_id, "key": keys[i], "row": rows.iloc[i].to_dict()}
        fh.write(json.dumps(jsonable(record)) + "\n")
    fh.flush()
    os.fsync(fh.fileno())
