"""The PACS cycle as library steps: pull -> ingest -> predict -> SR per series -> send -> watermark.

``flows/pacs.py`` runs each step as one Prefect task; ``medml pacs pull`` and ``medml listen``
call them directly. What passes between steps is de-identified (series keys, scan ids, paths
named by keys, predictions); original UIDs stay inside :func:`pull_new` (from the PACS search)
and :func:`send_reports` (from the inbox files' headers, read in memory).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pydicom

from medml.config import IngestConfig, PredictConfig, Settings
from medml.ingest.deid import KeyMaker, load_secret, shift_date
from medml.io import atomic_path, jsonable
from medml.lock import workspace_lock
from medml.pacs import inbox
from medml.pacs.config import PacsConfig
from medml.pacs.ledger import FAILED, PREDICTED, SENT, Ledger
from medml.pacs.receiver import Receipt
from medml.pacs.source import (
    PacsError,
    PacsUnavailable,
    open_sender,
    open_source,
    redact,
    series_key,
)
from medml.workspace import Workspace

log = logging.getLogger(__name__)


def inbox_dir(cfg: PacsConfig, ws: Workspace, part: str) -> Path:
    """Where pulled (``part="pull"``) or received (``"listen"``) series land: under
    ``pacs.inbox`` or ``WS/pacs/inbox``; apart, so that neither clears the other's files."""
    return Path(cfg.inbox or ws.root / "pacs" / "inbox").resolve() / part


def keymaker(ws: Workspace) -> KeyMaker:
    """The workspace's de-identification keys (the same ones ingestion uses)."""
    return KeyMaker(load_secret(ws.secret_file))


@dataclass(frozen=True)
class Model:
    """A registered model pinned to one version for a whole run."""

    uri: str  # models:/NAME/VERSION (or the URI as given when it names no registry version)
    name: str
    version: str

    @property
    def key(self) -> str:
        """What the ledger records the predictions under."""
        return f"{self.name}/{self.version}"


def resolve_model(uri: str) -> Model:
    """``models:/NAME@alias`` (or ``models:/NAME/V``) to the version it points at now."""
    from mlflow import MlflowClient

    if uri.startswith("models:/"):
        name, _, rest = uri.removeprefix("models:/").partition("@")
        if rest:
            version = str(MlflowClient().get_model_version_by_alias(name, rest).version)
        else:
            name, _, version = name.partition("/")
        if version:
            return Model(f"models:/{name}/{version}", name, version)
    return Model(uri, uri, "0")


def default_model_uri(settings: Settings) -> str:
    """``pacs.model_uri``, else ``models:/<prototypes.model_name>@champion``."""
    return settings.pacs.model_uri or f"models:/{settings.prototypes.model_name}@champion"


# ----------------------------------------------------------------------------- pull


@dataclass
class Pulled:
    """One run's pull (JSON-able, de-identified)."""

    since: str
    run_dir: str
    found: list[str] = field(default_factory=list)  # keys of every series the search found
    series: list[dict[str, Any]] = field(default_factory=list)  # key, folder, predicted
    failed: list[dict[str, str]] = field(default_factory=list)  # key, error (retried next run)
    skipped: int = 0  # already done by this model version
    deferred: int = 0  # over pacs.max_series: next run
    latest: str | None = None  # the newest study date found (YYYYMMDD)


def _study_date(value: str | None) -> bool:
    """Whether ``value`` is a DICOM DA date (YYYYMMDD), not anything else a PACS may send."""
    return bool(re.fullmatch(r"\d{8}", value or "")) and shift_date(value, 0) is not None


def _looked_back(watermark: str | None, days: int) -> str | None:
    """The search start: ``days`` before the watermark (YYYYMMDD), or None without one."""
    if not (days and _study_date(watermark)):
        return watermark
    return shift_date(watermark, -days).replace("-", "")  # ISO back to DA


def pull_new(
    cfg: PacsConfig, ws: Workspace, model: str | None = None, since: str | None = None
) -> Pulled:
    """Search the PACS for series dated from ``since`` (default: the watermark less
    ``pacs.lookback_days``, else ``pacs.since``) and retrieve those ``model`` has not finished
    into a fresh inbox run folder.

    Raises :class:`PacsUnavailable` when the PACS cannot be reached; a series whose retrieve
    fails or comes up short is listed in ``failed`` (and blocks the watermark)."""
    ledger = Ledger(ws.catalog_url)
    try:
        since = since or _looked_back(ledger.watermark(cfg.name), cfg.lookback_days) or cfg.since
        entries = ledger.entries(model) if model else {}
    finally:
        ledger.dispose()
    keys = keymaker(ws)
    root = inbox_dir(cfg, ws, "pull")
    run = time.strftime("run-%Y%m%dT%H%M%SZ", time.gmtime())
    inbox.sweep(root)  # what a killed run left (raw DICOM must not linger)
    result = Pulled(since=since, run_dir=str(root / run))
    source = open_source(cfg)
    refs = source.search(since)
    # only well-formed dates may become the watermark (a PACS may send "2024" or "2024-01-01")
    result.latest = max((r.study_date for r in refs if _study_date(r.study_date)), default=None)
    for ref in refs:
        key = series_key(keys, ref.series_uid)
        result.found.append(key)
        entry = entries.get(key)
        if entry and (entry.state in (SENT, FAILED) or not cfg.write_back):
            result.skipped += 1
            continue
        if cfg.max_series and len(result.series) >= cfg.max_series:
            result.deferred += 1
            continue
        try:
            folder = inbox.pull_series(source, ref, root / run, key)
        except PacsUnavailable:
            raise
        except PacsError as exc:
            log.warning("series %s not pulled: %s", key, redact(str(exc)))
            result.failed.append({"key": key, "error": redact(str(exc))})
            continue
        result.series.append({"key": key, "folder": str(folder), "predicted": entry is not None})
    log.info(
        "PACS %s since %s: %d series found, %d pulled, %d already done, %d failed, %d deferred",
        cfg.name,
        since,
        len(refs),
        len(result.series),
        result.skipped,
        len(result.failed),
        result.deferred,
    )
    return result


# ----------------------------------------------------------------------------- ingest


def ingest_folder(
    folder: Path, ws: Workspace, cfg: IngestConfig
) -> tuple[str, dict[str, dict[str, Any]]]:
    """Ingest ``folder`` (one sub-folder per series or study); return the report path and, per
    sub-folder name, its scan ids and (when nothing of it was ingested) the reason."""
    from medml.ingest import ingest

    result = ingest(folder, ws, None, cfg, progress=False)
    report = json.loads(Path(result.report_path).read_text())
    per: dict[str, dict[str, Any]] = {}
    for record in report["files"]:
        name = record["path"].split("/", 1)[0]
        entry = per.setdefault(name, {"scan_ids": [], "reasons": []})
        if record["status"] == "ingested" and record.get("scan_id"):
            if record["scan_id"] not in entry["scan_ids"]:
                entry["scan_ids"].append(record["scan_id"])
        elif record.get("reason"):
            entry["reasons"].append(f"{record['status']}: {record['reason']}")
    for entry in per.values():
        reasons = entry.pop("reasons")
        entry["error"] = None if entry["scan_ids"] else (reasons[0] if reasons else "no scan")
    return str(result.report_path), per


def ingest_pulled(pulled: Pulled, ws: Workspace, cfg: IngestConfig) -> dict[str, Any]:
    """Ingest the run's inbox folder with the same rules and de-identification as any folder."""
    run_dir = Path(pulled.run_dir)
    if not pulled.series or not run_dir.is_dir():
        return {"report": None, "series": {}}
    report, per = ingest_folder(run_dir, ws, cfg)
    for s in pulled.series:  # a series folder whose files were all unreadable is still listed
        per.setdefault(s["key"], {"scan_ids": [], "error": "no file ingested"})
    return {"report": report, "series": per}


def pull_and_ingest(settings: Settings, ws: Workspace, since: str | None = None) -> dict[str, Any]:
    """``medml pacs pull --ingest-only``: pull new series and ingest them (no prediction; the
    watermark stays, since nothing was predicted)."""
    pulled = pull_new(settings.pacs, ws, None, since)
    try:
        ingested = ingest_pulled(pulled, ws, settings.ingest)
    finally:
        for s in pulled.series:
            inbox.clear(Path(s["folder"]))
    per = ingested["series"].values()
    return {
        "since": pulled.since,
        "found": len(pulled.found),
        "pulled": len(pulled.series),
        "pull_failed": len(pulled.failed),
        "scans": sum(len(v["scan_ids"]) for v in per),
        "ingest_failed": sum(1 for v in per if v["error"]),
        "report": ingested["report"],
    }


# ----------------------------------------------------------------------------- predict


def predict_pulled(
    pulled: Pulled,
    ingested: dict[str, Any],
    model: Model,
    ws: Workspace,
    pc: PredictConfig,
    out: Path,
) -> dict[str, Any]:
    """Predict every pulled series this model version has not predicted; record each in the
    ledger (predictions, or the ingestion failure); write the run's rows to ``out``."""
    from medml.predict.batch import predict_frame

    ledger = Ledger(ws.catalog_url)
    todo = [s for s in pulled.series if not s["predicted"]]
    frame_rows, owners = [], []
    for s in todo:
        info = ingested["series"].get(s["key"], {"scan_ids": [], "error": "not ingested"})
        if info["error"]:
            ledger.record(s["key"], model.key, FAILED, [], [], error=info["error"])
            continue
        for scan_id in info["scan_ids"]:
            frame_rows.append({"path": str(ws.volume_path(scan_id)), "scan_id": scan_id})
            owners.append(s["key"])
    rows: list[dict[str, Any]] = []
    if frame_rows:
        summary = predict_frame(
            model.uri,
            pd.DataFrame(frame_rows, dtype=object),
            out,
            pc.batch_size,
            progress=False,
            formats=pc.formats,
            ledger=False,  # this module's ledger keys on (series, model version)
            workers=pc.workers,
        )
        table = pd.read_csv(summary.out) if summary.out.suffix == ".csv" else None
        table = table if table is not None else pd.read_parquet(summary.out)
        rows = jsonable(table.astype(object).where(table.notna(), None).to_dict("records"))
    by_series: dict[str, list[dict[str, Any]]] = {}
    for owner, row in zip(owners, rows):
        by_series.setdefault(owner, []).append(row)
    errors = 0
    for key, series_rows in by_series.items():
        failed = [r["error"] for r in series_rows if r.get("error")]
        scan_ids = [r["scan_id"] for r in series_rows]
        if failed:
            errors += 1
            ledger.record(key, model.key, FAILED, scan_ids, series_rows, error=failed[0])
        else:
            ledger.record(key, model.key, PREDICTED, scan_ids, series_rows)
    ledger.dispose()
    n_failed_ingest = len(todo) - len(by_series)
    return {
        "predictions": str(out) if frame_rows else None,
        "series": len(by_series),
        "scans": len(rows),
        "errors": errors + n_failed_ingest,
    }


# ----------------------------------------------------------------------------- send


def headers(folder: Path) -> list[pydicom.Dataset]:
    """The instance headers of a series folder, in memory (no pixel data)."""
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]


SEND_CHUNK = 50  # SRs per STOW-RS request / C-STORE association


def send_reports(pulled: Pulled, model: Model, ws: Workspace, cfg: PacsConfig) -> dict[str, Any]:
    """Build and send one SR per predicted, unsent series of this run; record each send.

    SRs go in chunks (one STOW-RS request or C-STORE association each); a chunk the PACS
    refuses is sent again one SR at a time, so each series gets its own outcome. With
    ``pacs.write_back: false`` nothing is sent. Every series folder of the run is removed
    afterwards, sent or not (a series whose send failed is pulled and sent again next run)."""
    from medml.pacs.sr import build_sr

    ledger = Ledger(ws.catalog_url)
    entries = ledger.entries(model.key, [s["key"] for s in pulled.series])
    outcome: dict[str, str | None] = {}  # key -> error (None: sent)
    try:
        built = []
        for s in pulled.series if cfg.write_back else []:
            entry = entries.get(s["key"])
            if entry is None or entry.state != PREDICTED:
                continue
            try:
                evidence = headers(Path(s["folder"]))
                built.append(
                    (s["key"], build_sr(evidence, entry.rows, model.name, model.version, s["key"]))
                )
            except (ValueError, OSError) as exc:
                outcome[s["key"]] = redact(f"SR not built: {exc}")
        if built:
            outcome.update(_send(open_sender(cfg), built))
        for key, error in outcome.items():
            ledger.sent(key, model.key, ok=error is None, error=error)
    finally:
        ledger.dispose()
        for s in pulled.series:
            inbox.clear(Path(s["folder"]))
    failed = [{"key": k, "error": e} for k, e in outcome.items() if e is not None]
    sent = len(outcome) - len(failed)
    log.info("sent %d SRs, %d failed", sent, len(failed))
    return {"sent": sent, "failed": failed, "write_back": cfg.write_back}


def _send(sender: Any, built: list[tuple[str, Any]]) -> dict[str, str | None]:
    """Send ``(key, sr)`` pairs in chunks; return each key's error (None: sent)."""
    outcome: dict[str, str | None] = {}
    for i in range(0, len(built), SEND_CHUNK):
        chunk = built[i : i + SEND_CHUNK]
        try:
            sender.store([sr for _, sr in chunk])
            outcome.update({key: None for key, _ in chunk})
            continue
        except PacsUnavailable as exc:  # the PACS is gone: the rest waits for the next run
            error = redact(str(exc))
            outcome.update({key: error for key, _ in built[i:]})
            return outcome
        except PacsError:
            pass
        for key, sr in chunk:  # refused as a whole: one by one, to know which
            try:
                sender.store([sr])
                outcome[key] = None
            except PacsError as exc:
                outcome[key] = redact(str(exc))
    return outcome


# ----------------------------------------------------------------------------- watermark


def advance_watermark(
    pulled: Pulled, sent: dict[str, Any], model: Model, ws: Workspace, cfg: PacsConfig
) -> str | None:
    """Move the watermark to the newest study date found, if every series found is finished
    for this model version (sent, or predicted with write-back off, or failed ingestion);
    return the watermark after the call."""
    ledger = Ledger(ws.catalog_url)
    try:
        entries = ledger.entries(model.key, pulled.found)
        done = {SENT, FAILED} | ({PREDICTED} if not cfg.write_back else set())
        finished = all(k in entries and entries[k].state in done for k in pulled.found)
        if finished and not pulled.failed and not pulled.deferred and pulled.latest:
            ledger.move_watermark(cfg.name, pulled.latest)
        elif not finished or pulled.failed or pulled.deferred:
            log.info("watermark of %s stays: not every series found is finished", cfg.name)
        return ledger.watermark(cfg.name)
    finally:
        ledger.dispose()


def write_run_table(
    pulled: Pulled, ingested: dict[str, Any], model: Model, ws: Workspace, out: Path
) -> Path:
    """One row per series found this run: key, state, scan ids, class, error (a CSV)."""
    ledger = Ledger(ws.catalog_url)
    entries = ledger.entries(model.key, pulled.found)
    ledger.dispose()
    failed = {f["key"]: f["error"] for f in pulled.failed}
    rows = []
    for key in pulled.found:
        e = entries.get(key)
        first = e.rows[0] if e and e.rows else {}
        rows.append(
            {
                "series_key": key,
                "state": e.state if e else ("pull failed" if key in failed else "pending"),
                "scan_ids": " ".join(e.scan_ids) if e else "",
                "predicted_class": first.get("predicted_class"),
                "similarity": first.get("similarity"),
                "unknown": first.get("unknown"),
                "model": model.key,
                "sends": e.sends if e else 0,
                "error": failed.get(key) or (e.error if e else None),
            }
        )
    with atomic_path(out, suffix=".csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    return out


def summary(pulled: Pulled) -> dict[str, Any]:
    """The pull as a plain dict (the flow's task results are JSON)."""
    return asdict(pulled)


# ----------------------------------------------------------------------------- listen


def ingest_received(settings: Settings, ws: Workspace) -> Callable[[Receipt], None]:
    """The receiver's hand-on: ingest each quiet study, then remove its raw files."""

    def hand_on(receipt: Receipt) -> None:
        # queue behind another writer (a training) rather than strand the study in the inbox
        with workspace_lock(ws.root, "listen", wait=True, catalog_url=ws.catalog_url):
            report, per = ingest_folder(receipt.folder.parent, ws, settings.ingest)
        own = per.get(receipt.folder.name, {"scan_ids": [], "error": "nothing ingested"})
        note = f" ({own['error']})" if own["error"] else ""
        n = len(own["scan_ids"])
        log.info("study %s: %d scans ingested%s; report %s", receipt.study_key, n, note, report)
        inbox.clear(receipt.folder)  # the report accounts for every file; raw data goes

    return hand_on
