"""The PACS watermark and ledger, two tables in the workspace catalog (SQLAlchemy Core).

- ``pacs_watermark``: per source name, the study date (YYYYMMDD) the next search starts from.
  It moves only after a run in which every series found was predicted and sent (or failed
  ingestion for good); a run that is killed, or whose PACS is down, leaves it where it was.
- ``pacs_ledger``: per (series key, model version) the prediction rows and whether their SR
  was sent. A series a model version predicted is never predicted again; one whose SR was sent
  is never sent again; one whose send failed is sent on the next run from the stored rows.

Only keyed hashes and predictions are stored: no UID, no patient attribute, no real study date
tied to a series (the watermark is one date for the whole source).
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from medml.io import jsonable

metadata = sa.MetaData()

watermarks = sa.Table(
    "pacs_watermark",
    metadata,
    sa.Column("source", sa.String(64), primary_key=True),
    sa.Column("study_date", sa.String(8), nullable=False),
    sa.Column("updated", sa.String(32), nullable=False),
)

ledger = sa.Table(
    "pacs_ledger",
    metadata,
    sa.Column("series_key", sa.String(32), primary_key=True),
    sa.Column("model", sa.String(256), primary_key=True),  # NAME/VERSION
    sa.Column("state", sa.String(16), nullable=False),  # predicted | sent | failed
    sa.Column("scan_ids", sa.Text),  # JSON list
    sa.Column("rows", sa.Text),  # JSON list of prediction rows (de-identified)
    sa.Column("error", sa.Text),
    sa.Column("sends", sa.Integer, nullable=False, server_default="0"),  # attempts so far
    sa.Column("updated", sa.String(32), nullable=False),
)

PREDICTED, SENT, FAILED = "predicted", "sent", "failed"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Entry:
    """One ledger row."""

    series_key: str
    model: str
    state: str
    scan_ids: list[str]
    rows: list[dict[str, Any]]
    error: str | None
    sends: int


class Ledger:
    """Watermark and ledger on the catalog database (each method one transaction)."""

    def __init__(self, url: str, schema: str | None = None) -> None:
        engine = sa.create_engine(url, future=True)
        if schema:
            engine = engine.execution_options(schema_translate_map={None: schema})
        self.engine = engine
        metadata.create_all(engine)

    def watermark(self, source: str) -> str | None:
        """The study date the next search of ``source`` starts from, or None (first run)."""
        with self.engine.connect() as conn:
            query = sa.select(watermarks.c.study_date).where(watermarks.c.source == source)
            return conn.execute(query).scalar_one_or_none()

    def move_watermark(self, source: str, study_date: str) -> None:
        """Set the watermark of ``source`` (never backwards)."""
        current = self.watermark(source)
        if current is not None and current >= study_date:
            return
        with self.engine.begin() as conn:
            conn.execute(sa.delete(watermarks).where(watermarks.c.source == source))
            conn.execute(
                sa.insert(watermarks).values(source=source, study_date=study_date, updated=_now())
            )

    def entries(self, model: str, keys: list[str] | None = None) -> dict[str, Entry]:
        """Ledger rows of ``model`` (optionally only ``keys``), by series key."""
        query = sa.select(ledger).where(ledger.c.model == model)
        if keys is not None:
            query = query.where(ledger.c.series_key.in_(keys))
        with self.engine.connect() as conn:
            return {r["series_key"]: _entry(r) for r in conn.execute(query).mappings()}

    def record(
        self,
        series_key: str,
        model: str,
        state: str,
        scan_ids: list[str] | None = None,
        rows: list[dict[str, Any]] | None = None,
        error: str | None = None,
    ) -> None:
        """Insert or replace the row of (series, model)."""
        old = self.entries(model, [series_key]).get(series_key)
        scan_ids = scan_ids if scan_ids is not None else old.scan_ids if old else []
        rows = rows if rows is not None else old.rows if old else []
        values = {
            "series_key": series_key,
            "model": model,
            "state": state,
            "scan_ids": json.dumps(scan_ids),
            "rows": json.dumps(jsonable(rows)),
            "error": error,
            "sends": old.sends if old else 0,
            "updated": _now(),
        }
        with self.engine.begin() as conn:
            key = (ledger.c.series_key == series_key) & (ledger.c.model == model)
            conn.execute(sa.delete(ledger).where(key))
            conn.execute(sa.insert(ledger).values(**values))

    def sent(self, series_key: str, model: str, ok: bool, error: str | None = None) -> None:
        """Count a send attempt; mark the row sent when ``ok``."""
        with self.engine.begin() as conn:
            key = (ledger.c.series_key == series_key) & (ledger.c.model == model)
            values: dict[str, Any] = {"sends": ledger.c.sends + 1, "updated": _now()}
            values.update({"state": SENT, "error": None} if ok else {"error": error})
            conn.execute(sa.update(ledger).where(key).values(**values))

    def dispose(self) -> None:
        self.engine.dispose()


def _entry(r: Any) -> Entry:
    return Entry(
        r["series_key"],
        r["model"],
        r["state"],
        json.loads(r["scan_ids"] or "[]"),
        json.loads(r["rows"] or "[]"),
        r["error"],
        int(r["sends"] or 0),
    )
