"""The scan catalog: SQLAlchemy Core over SQLite by default, PostgreSQL by URL.

Only de-identified keys are stored: scan ids, patient and study keys are keyed hashes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa

metadata = sa.MetaData()

scans = sa.Table(
    "scans",
    metadata,
    sa.Column("scan_id", sa.String(32), primary_key=True),
    sa.Column("patient_key", sa.String(32), nullable=False, index=True),
    sa.Column("study_key", sa.String(32)),
    sa.Column("modality", sa.String(8)),
    sa.Column("shape", sa.String(64)),
    sa.Column("spacing", sa.String(64)),
    sa.Column("orientation", sa.String(8)),
    sa.Column("source_format", sa.String(16)),
    sa.Column("content_hash", sa.String(64)),
    sa.Column("label", sa.String(64)),
    sa.Column("class_set", sa.String(16), server_default="base"),
    sa.Column("split", sa.String(8), index=True),
    sa.Column("volume", sa.String(256), nullable=False),
    sa.Column("ingest_run", sa.String(32)),
)

quarantine = sa.Table(
    "quarantine",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ingest_run", sa.String(32), index=True),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("details", sa.Text),
)

ingest_runs = sa.Table(
    "ingest_runs",
    metadata,
    sa.Column("run_id", sa.String(32), primary_key=True),
    sa.Column("source", sa.Text),
    sa.Column("started", sa.String(32)),
    sa.Column("finished", sa.String(32)),
    sa.Column("report", sa.Text),
    sa.Column("n_files", sa.Integer),
    sa.Column("n_scans", sa.Integer),
)


class Catalog:
    """Thin access layer: every method is one transaction."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = sa.create_engine(url, future=True)
        metadata.create_all(self.engine)

    def get_scan(self, scan_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = (
                conn.execute(sa.select(scans).where(scans.c.scan_id == scan_id)).mappings().first()
            )
        return dict(row) if row else None

    def upsert_scan(self, row: Mapping[str, Any]) -> None:
        """Insert or replace one scan (portable across SQLite and PostgreSQL)."""
        with self.engine.begin() as conn:
            conn.execute(sa.delete(scans).where(scans.c.scan_id == row["scan_id"]))
            conn.execute(sa.insert(scans).values(**row))

    def list_scans(self, split: str | None = None, labelled: bool = True) -> list[dict[str, Any]]:
        """Scans ordered by id; optionally one split, optionally only labelled ones."""
        query = sa.select(scans).order_by(scans.c.scan_id)
        if split is not None:
            query = query.where(scans.c.split == split)
        if labelled:
            query = query.where(scans.c.label.is_not(None))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def set_splits(self, assignment: Mapping[str, str]) -> None:
        """Write ``scan_id -> split``."""
        with self.engine.begin() as conn:
            for scan_id, split in assignment.items():
                conn.execute(sa.update(scans).where(scans.c.scan_id == scan_id).values(split=split))

    def record_run(self, run: Mapping[str, Any], quarantined: Iterable[Mapping[str, Any]]) -> None:
        """Store an ingest run and the files it quarantined."""
        with self.engine.begin() as conn:
            conn.execute(sa.delete(ingest_runs).where(ingest_runs.c.run_id == run["run_id"]))
            conn.execute(sa.insert(ingest_runs).values(**run))
            rows = [dict(q, ingest_run=run["run_id"]) for q in quarantined]
            if rows:
                conn.execute(sa.insert(quarantine), rows)

    def quarantined(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(sa.select(quarantine)).mappings()]
