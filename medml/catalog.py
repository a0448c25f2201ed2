"""The scan catalog: SQLAlchemy Core over SQLite by default, PostgreSQL by URL.

Only de-identified keys are stored: scan ids, patient and study keys are keyed hashes, study
dates are shifted per patient (or absent).
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
    # Added by the ingestion issue (nullable, so older catalogs gain them in place):
    sa.Column("source_hash", sa.String(64)),  # keyed hash of the source files' bytes
    sa.Column("study_date", sa.String(10)),  # ISO date, shifted per patient
    sa.Column("n_files", sa.Integer),
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
    """Thin access layer: every method is one transaction.

    ``schema`` (PostgreSQL) puts the tables in that schema, created if missing: tests and
    projects that share a server keep apart that way.
    """

    def __init__(self, url: str, schema: str | None = None) -> None:
        self.url = url
        self.schema = schema
        engine = sa.create_engine(url, future=True)
        if schema:
            with engine.begin() as conn:
                conn.execute(sa.schema.CreateSchema(schema, if_not_exists=True))
            engine = engine.execution_options(schema_translate_map={None: schema})
        self.engine = engine
        self._create_tables()

    def _create_tables(self, attempts: int = 5) -> None:
        """Create missing tables and columns, safe against processes doing it at the same time.

        ``create_all`` checks, then creates: two processes creating one catalog both see no
        table and the second fails ("table ... already exists", or PostgreSQL's unique
        violation on its type catalog). Whoever loses just checks again and finds the tables.
        """
        for attempt in range(attempts):
            try:
                with self.engine.connect() as conn:
                    if conn.dialect.name == "sqlite":
                        # one transaction, one fsync: pysqlite runs DDL outside transactions,
                        # so each CREATE was committed (and synced) on its own, ~0.1 s in all.
                        # IMMEDIATE: the write lock first, so processes creating one catalog at
                        # once wait for each other (a deferred BEGIN upgrades its read lock and
                        # deadlocks, "database is locked" at once, without waiting)
                        conn.exec_driver_sql("BEGIN IMMEDIATE")
                    metadata.create_all(conn)
                    conn.commit()
                self._add_missing_columns()
                return
            except (sa.exc.OperationalError, sa.exc.ProgrammingError, sa.exc.IntegrityError) as e:
                text = str(e.orig).lower()
                race = ("already exists", "duplicate", "database is locked")
                if attempt == attempts - 1 or not any(r in text for r in race):
                    raise

    def _add_missing_columns(self) -> None:
        """Add nullable columns introduced after a catalog was created (no migration tool)."""
        inspector = sa.inspect(self.engine)
        for table in (scans, quarantine, ingest_runs):
            have = {c["name"] for c in inspector.get_columns(table.name, schema=self.schema)}
            missing = [c for c in table.columns if c.name not in have and c.nullable]
            if not missing:
                continue
            prefix = self.engine.dialect.identifier_preparer
            name = (
                prefix.format_table(table)
                if not self.schema
                else (f"{prefix.quote_schema(self.schema)}.{prefix.quote(table.name)}")
            )
            with self.engine.begin() as conn:
                for col in missing:
                    kind = col.type.compile(dialect=self.engine.dialect)
                    conn.execute(
                        sa.text(f"ALTER TABLE {name} ADD COLUMN {prefix.quote(col.name)} {kind}")
                    )

    def get_scan(self, scan_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = (
                conn.execute(sa.select(scans).where(scans.c.scan_id == scan_id)).mappings().first()
            )
        return dict(row) if row else None

    def scans_by_id(self) -> dict[str, dict[str, Any]]:
        """Every scan row, labelled or not, keyed by scan id."""
        with self.engine.connect() as conn:
            return {r["scan_id"]: dict(r) for r in conn.execute(sa.select(scans)).mappings()}

    def upsert_scan(self, row: Mapping[str, Any]) -> None:
        """Insert or replace one scan (portable across SQLite and PostgreSQL)."""
        self.upsert_scans([row])

    def upsert_scans(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Insert or replace several scans in one transaction.

        A row without a split keeps the split stored for that scan: a scan keeps its split for
        ever (new scans get one from ``medml.data.splits``), even when its row was read before
        a concurrent training assigned it, and even when it is relabelled.
        """
        rows = [dict(r) for r in rows]
        if not rows:
            return
        ids = [r["scan_id"] for r in rows]
        with self.engine.begin() as conn:
            stored = dict(
                conn.execute(
                    sa.select(scans.c.scan_id, scans.c.split).where(scans.c.scan_id.in_(ids))
                ).all()
            )
            for r in rows:
                if r.get("split") is None:
                    r["split"] = stored.get(r["scan_id"])
            conn.execute(sa.delete(scans).where(scans.c.scan_id.in_(ids)))
            conn.execute(sa.insert(scans), rows)

    def list_scans(
        self, split: str | None = None, labelled: bool = True, class_set: str | None = None
    ) -> list[dict[str, Any]]:
        """Scans ordered by content; optionally one split, only labelled ones, one class set.

        ``class_set="base"`` also matches rows without a class set (catalogs older than it).

        Ordered by the voxel content hash (scan id breaks ties), not by id alone: ids are keyed
        hashes that differ with each workspace's secret, and everything downstream (batches,
        support sets, episodes) follows this order, so the same data must come in the same order.
        """
        query = sa.select(scans).order_by(scans.c.content_hash, scans.c.scan_id)
        if split is not None:
            query = query.where(scans.c.split == split)
        if labelled:
            query = query.where(scans.c.label.is_not(None))
        if class_set == "base":
            query = query.where(sa.or_(scans.c.class_set == "base", scans.c.class_set.is_(None)))
        elif class_set is not None:
            query = query.where(scans.c.class_set == class_set)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def set_splits(self, assignment: Mapping[str, str]) -> None:
        """Write ``scan_id -> split``."""
        with self.engine.begin() as conn:
            for scan_id, split in assignment.items():
                conn.execute(sa.update(scans).where(scans.c.scan_id == scan_id).values(split=split))

    def record_run(self, run: Mapping[str, Any], quarantined: Iterable[Mapping[str, Any]]) -> None:
        """Store an ingest run and the files it quarantined (one transaction)."""
        with self.engine.begin() as conn:
            conn.execute(sa.delete(quarantine).where(quarantine.c.ingest_run == run["run_id"]))
            conn.execute(sa.delete(ingest_runs).where(ingest_runs.c.run_id == run["run_id"]))
            conn.execute(sa.insert(ingest_runs).values(**run))
            rows = [dict(q, ingest_run=run["run_id"]) for q in quarantined]
            if rows:
                conn.execute(sa.insert(quarantine), rows)

    def quarantined(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Quarantined files: of one ingest run, or of every run."""
        query = sa.select(quarantine).order_by(quarantine.c.id)
        if run_id is not None:
            query = query.where(quarantine.c.ingest_run == run_id)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def runs(self) -> list[dict[str, Any]]:
        """Completed ingest runs, oldest first."""
        with self.engine.connect() as conn:
            query = sa.select(ingest_runs).order_by(ingest_runs.c.started)
            return [dict(r) for r in conn.execute(query).mappings()]

    def dispose(self) -> None:
        self.engine.dispose()
