"""Batch inference: many scans through a registered model, one output row per input.

Rows follow the inputs' order (:mod:`medml.predict.inputs`), with the ``input`` column first
(:func:`medml.predict.pyfunc.output_columns`, the schema documented in docs/inference.md).
Streams: each batch is embedded, classified and appended to the output files while worker
processes read and preprocess the next few (``medml.predict.prefetch``), so memory does not
grow with the number of scans. Idempotent: a ledger next to the output
(``<out>.ledger.jsonl``) records, per model (MLflow model uuid) and input fingerprint (path,
size, mtime; hashed, so no path is stored), the row already predicted; a re-run with the same
model re-emits those rows without reading the scans again (unless explanations are asked for:
those need the volume). Error rows are never recorded, so a fixed input is retried.

Logs and summaries name an input by its position (1-based row of the prediction file) and its
scan id, never by its path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd
import pyarrow as pa

from medml.io import jsonable, remove_stale_temporaries
from medml.models.inference import device
from medml.predict.inputs import Input, discover_inputs
from medml.predict.loader import open_model
from medml.predict.output import TableWriter
from medml.predict.prefetch import Prefetcher, auto_workers
from medml.predict.pyfunc import MedmlModel, output_columns, prob_column
from medml.progress import Progress

__all__ = ["Input", "PredictionSummary", "discover_inputs", "inputs_frame", "predict_frame"]

MAX_FAILURES = 50  # failed inputs kept in a summary (all of them are in the prediction file)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictionSummary:
    out: Path
    n_inputs: int
    n_errors: int
    seconds: float
    counts: dict[str, int]
    n_skipped: int = 0  # already predicted by this model (from the ledger)
    files: list[Path] = field(default_factory=list)  # every output written
    # the first MAX_FAILURES failed inputs: {"position", "scan_id", "error"} (no paths)
    failures: list[dict[str, Any]] = field(default_factory=list)
    rows: pd.DataFrame | None = None  # every row, when asked for (keep_rows)
    n_explained: int = 0

    @property
    def scans_per_s(self) -> float:
        return self.n_inputs / self.seconds if self.seconds > 0 else float("nan")


def inputs_frame(inputs: Sequence[str | Path]) -> pd.DataFrame:
    """The frame :func:`predict_frame` takes for the paths a user gave: one row per input found
    (``path``, and ``error`` where it is known before reading)."""
    found = discover_inputs(list(inputs))
    return pd.DataFrame(
        {"path": [i.path for i in found], "error": [i.error for i in found]}, dtype=object
    )


def fingerprint(path: str, scan_id: str | None = None) -> str:
    """Hash of an input's path, sizes and modification times (a folder: of its files)."""
    h = hashlib.sha256(str(Path(path).resolve()).encode())
    h.update(str(scan_id or "").encode())
    p = Path(path)
    try:
        entries = sorted(q for q in p.iterdir() if q.is_file()) if p.is_dir() else [p]
    except OSError:  # unreadable: predicted as an error row, never recorded
        entries = []
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
    types = {"similarity": pa.float64(), "margin": pa.float64(), "unknown": pa.bool_()}
    types.update({prob_column(c): pa.float64() for c in classes})
    return pa.schema([(c, types.get(c, pa.string())) for c in output_columns(classes)])


def _batches(frame: pd.DataFrame, size: int) -> Iterator[pd.DataFrame]:
    for i in range(0, len(frame), size):
        yield frame.iloc[i : i + size].reset_index(drop=True)


def _normalised(frame: pd.DataFrame) -> pd.DataFrame:
    """``path`` (+ optional ``scan_id``, ``error``) with a clean index and 1-based positions."""
    frame = frame.reset_index(drop=True)
    out = pd.DataFrame({"path": frame["path"].astype(str).astype(object)})
    for col in ("scan_id", "error"):
        values = frame[col] if col in frame.columns else [None] * len(frame)
        out[col] = [v if isinstance(v, str) and v else None for v in values]
    out["_pos"] = np.arange(1, len(out) + 1)
    return out


def predict_frame(
    model_uri: str,
    frame: pd.DataFrame,
    out: Path | None = None,
    batch_size: int = 8,
    progress: bool = True,
    formats: Sequence[str] | None = None,
    ledger: bool = True,
    explain: Path | None = None,
    workers: int | None = None,
    keep_rows: bool = False,
) -> PredictionSummary:
    """Predict each row of ``frame`` (``path``, optional ``scan_id``, and ``error`` for inputs
    known to be unusable, as :func:`inputs_frame` gives) into ``out``, in row order.

    ``formats`` (``csv``/``parquet``) write ``out`` with each suffix; by default only ``out``
    as named. Without ``out`` nothing is written and the rows come back in the summary (as
    with ``keep_rows``). ``explain`` writes a PNG per predicted scan into that folder, for
    inputs whose prediction the ledger reuses too. ``workers`` processes read and preprocess
    the next batches while one is embedded (None: the model's ``predict.workers`` setting,
    where None means one per CPU for large inputs).
    """
    start = time.perf_counter()
    opened = open_model(model_uri)
    model, model_id = opened.model, opened.model_id
    frame = _normalised(frame)
    if formats is None:
        formats = ["parquet" if out is not None and Path(out).suffix == ".parquet" else "csv"]
    paths = {} if out is None else {fmt: Path(out).with_suffix(f".{fmt}") for fmt in formats}
    if paths:  # hidden temporaries of a predict killed mid-write (their writer is dead)
        remove_stale_temporaries(Path(out).parent, [p.name for p in paths.values()])
    book = ledger_path(Path(out)) if out is not None and ledger else None
    done = _read_ledger(book, model_id) if book is not None else {}
    frame["_key"] = [
        None if err else fingerprint(p, sid)
        for p, sid, err in zip(frame["path"], frame["scan_id"], frame["error"])
    ]
    batches = list(_batches(frame, batch_size))
    masks = [_masks(b, done, explain is not None) for b in batches]
    todo_paths = [list(b.loc[m["prepare"], "path"]) for b, m in zip(batches, masks)]
    pc = model.settings.predict
    n_workers = auto_workers(
        sum(map(len, todo_paths)), pc.workers if workers is None else workers, pc.parallel_min
    )
    tally = _Tally(keep_rows or out is None)
    with contextlib.ExitStack() as stack:
        schema = arrow_schema(model.prototypes.classes)
        writer = TableWriter(stack, paths, schema) if paths else None
        ledger_fh = stack.enter_context(book.open("a")) if book is not None else None
        # The workers embed too where they can (CPU, nothing to explain, a batch or more per
        # worker: one batch is one job): the volumes then never leave them, and this process
        # only decides and writes.
        enough = sum(1 for b in todo_paths if b) >= 2 * n_workers
        in_workers = n_workers > 1 and enough and explain is None and device().type == "cpu"
        prefetch = stack.enter_context(
            Prefetcher(model.settings.preprocess, n_workers, ingest=model.settings.ingest,
                       encoder=model.encoder if in_workers else None, dim=model.dim)
        )  # fmt: skip
        bar = stack.enter_context(Progress(len(frame), "predict", enabled=progress))
        stream = prefetch.embed_map(todo_paths) if in_workers else prefetch.map(todo_paths)
        for batch, mask, (got, ids, errors) in zip(batches, masks, stream):
            # the workers' embeddings, or volumes to embed here (kept for the explanations)
            vols, emb = (None, got) if in_workers else (got, model.embed_volumes(got))
            fresh, neighbours, fresh_idx = _fresh_rows(model, batch, mask, (emb, ids, errors))
            ok = [j for j, e in enumerate(fresh["error"]) if e is None]
            if explain is not None:
                tally.n_explained += _explain(model, batch, fresh, vols, mask, neighbours, ok,
                                              Path(explain))  # fmt: skip
            new = [j for j in ok if not mask["cached"][fresh_idx[j]]]
            if ledger_fh is not None:  # error rows are never recorded: they are retried
                _record(ledger_fh, model_id, batch["_key"].iloc[fresh_idx].tolist(), fresh, new)
            result = _merge(batch, mask, fresh, fresh_idx, done, model.prototypes.classes)
            if writer is not None:
                writer.write(result)
            tally.add(result, batch["_pos"].to_numpy(), int(mask["cached"].sum()))
            bar.update(len(batch))
        if writer is not None:
            writer.finish()
    return tally.summary(
        Path(out).with_suffix(f".{formats[0]}") if out is not None else None,
        len(frame),
        time.perf_counter() - start,
        list(paths.values()),
    )


def _masks(batch: pd.DataFrame, done: dict[str, dict], explain: bool) -> dict[str, np.ndarray]:
    """Per row: known unusable, reused from the ledger, to be read and preprocessed."""
    known_bad = batch["error"].notna().to_numpy()
    cached = batch["_key"].isin(list(done)).to_numpy() & ~known_bad
    prepare = ~known_bad & (~cached | explain)
    return {"known_bad": known_bad, "cached": cached, "prepare": prepare}


def _fresh_rows(
    model: MedmlModel, batch: pd.DataFrame, mask: dict[str, np.ndarray], prepared: tuple
) -> tuple[pd.DataFrame, list[list[int]], list[int]]:
    """Rows computed now (prepared inputs and known-bad ones), their nearest support indices,
    and their indices within the batch. ``prepared``: the embeddings, scan ids and errors of
    the batch's prepared inputs."""
    emb_p, ids_p, errs_p = prepared
    prep_at = {i: j for j, i in enumerate(np.flatnonzero(mask["prepare"]))}
    fresh_idx = [i for i in range(len(batch)) if mask["prepare"][i] or mask["known_bad"][i]]
    emb = np.full((len(fresh_idx), model.dim), np.nan, dtype=np.float32)
    ids, errors = [], []
    for k, i in enumerate(fresh_idx):
        given = batch["scan_id"].iloc[i]
        if i in prep_at:
            j = prep_at[i]
            emb[k] = emb_p[j]
            ids.append(given or ids_p[j])
            errors.append(errs_p[j])
        else:
            ids.append(given)
            errors.append(batch["error"].iloc[i])
    inputs = batch["path"].iloc[fresh_idx].tolist()
    rows, neighbours = model.rows(inputs, emb, ids, errors)
    return rows, neighbours, fresh_idx


def _merge(
    batch: pd.DataFrame,
    mask: dict[str, np.ndarray],
    fresh: pd.DataFrame,
    fresh_idx: list[int],
    done: dict[str, dict],
    classes: list[str],
) -> pd.DataFrame:
    """The batch's rows in input order: ledger rows where reused, fresh rows otherwise."""
    parts = []
    keep = [j for j, i in enumerate(fresh_idx) if not mask["cached"][i]]
    if keep:
        parts.append(fresh.iloc[keep].set_axis([fresh_idx[j] for j in keep]))
    cached = np.flatnonzero(mask["cached"])
    if len(cached):
        reused = pd.DataFrame([done[k] for k in batch["_key"].iloc[cached]]).set_axis(cached)
        reused["input"] = batch["path"].iloc[cached].to_numpy()  # as given this time
        parts.append(reused)
    parts = [p for p in parts if len(p)]
    result = pd.concat(parts).sort_index() if parts else fresh.iloc[:0]
    return result.reindex(columns=output_columns(classes))


@dataclass
class _Tally:
    """Counts, failures (by position and scan id, never by path) and optionally every row."""

    keep_rows: bool
    counts: Counter = field(default_factory=Counter)
    n_err: int = 0
    n_skip: int = 0
    n_explained: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    frames: list[pd.DataFrame] = field(default_factory=list)

    def add(self, result: pd.DataFrame, positions: np.ndarray, n_cached: int) -> None:
        self.n_skip += n_cached
        self.counts.update(result["predicted_class"].dropna().tolist())
        for pos, sid, err in zip(positions, result["scan_id"], result["error"]):
            sid = sid if isinstance(sid, str) else None
            if isinstance(err, str):
                self.n_err += 1
                log.warning("input %d (scan %s): %s", pos, sid or "-", err)
                if len(self.failures) < MAX_FAILURES:
                    self.failures.append({"position": int(pos), "scan_id": sid, "error": err})
        if self.keep_rows:
            self.frames.append(result)

    def summary(self, out: Path | None, n: int, seconds: float, files: list[Path]):
        rows = None
        if self.keep_rows:
            rows = pd.concat(self.frames, ignore_index=True) if self.frames else None
        return PredictionSummary(
            out, n, self.n_err, seconds, dict(self.counts), self.n_skip, files,
            self.failures, rows, self.n_explained,
        )  # fmt: skip


def _explain(
    model: MedmlModel,
    batch: pd.DataFrame,
    rows: pd.DataFrame,
    volumes: list,
    mask: dict[str, np.ndarray],
    neighbours: list[list[int]],
    ok: list[int],
    folder: Path,
) -> int:
    """An explanation PNG per predicted row (``ok``: fresh rows without an error)."""
    from medml.predict.explain import write_explanation

    vols = dict(zip(np.flatnonzero(mask["prepare"]), volumes))
    fresh_idx = [i for i in range(len(batch)) if mask["prepare"][i] or mask["known_bad"][i]]
    for j in ok:
        i = fresh_idx[j]
        write_explanation(
            model, vols[i], rows.iloc[j], neighbours[j], int(batch["_pos"].iloc[i]), folder
        )
    return len(ok)


def _record(fh: TextIO, model_id: str, keys: list, rows: pd.DataFrame, new: list[int]) -> None:
    """Append the newly predicted rows to the ledger, durably (flushed and fsynced)."""
    for j in new:
        row = rows.iloc[j].drop(labels=["input"]).to_dict()  # the path stays out of the ledger
        fh.write(json.dumps(jsonable({"model": model_id, "key": keys[j], "row": row})) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def write_rows(records: list[dict[str, Any]], out: Path, formats: Sequence[str]) -> dict[str, Any]:
    """Write prediction rows (the dicts ``predict_frame(..., out=None)`` returns, in input
    order) to ``out`` in each format, with the same schema and CSV escaping as
    :func:`predict_frame`; counts and the first failures by position."""
    from medml.predict.output import write_table

    frame = pd.DataFrame(records)
    classes = [c.removeprefix("prob_") for c in frame.columns if c.startswith("prob_")]
    frame = frame.reindex(columns=output_columns(classes))
    paths = {fmt: Path(out).with_suffix(f".{fmt}") for fmt in formats}
    write_table(frame, paths, arrow_schema(classes))
    tally = _Tally(keep_rows=False)
    tally.add(frame, np.arange(1, len(frame) + 1), 0)
    own = Path(out).suffix.lstrip(".")
    return {
        "predictions": str(paths[own if own in paths else formats[0]]),
        "files": [str(p) for p in paths.values()],
        "n": len(frame),
        "errors": tally.n_err,
        "counts": dict(tally.counts),
        "failures": tally.failures,
    }
