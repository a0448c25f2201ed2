"""The ingest report (a contract, see ARCHITECTURE.md): every source file accounted for."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from medml.io import atomic_write_text

Status = Literal["ingested", "skipped", "quarantined"]


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class FileRecord:
    """One input file's outcome; ``path`` is relative to the source folder."""

    path: str
    status: Status
    scan_id: str | None = None
    reason: str | None = None
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        if self.status != "ingested":
            out.pop("warnings", None)
        return out


@dataclass
class IngestReport:
    """Accumulates records; :meth:`write` saves the contract JSON atomically."""

    source: str
    started: str = field(default_factory=utc_now)
    finished: str | None = None
    files: list[FileRecord] = field(default_factory=list)
    links_not_followed: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        by_status = Counter(r.status for r in self.files)
        scans = {r.scan_id for r in self.files if r.status == "ingested"}
        return {
            "files": len(self.files),
            "ingested": by_status["ingested"],
            "skipped": by_status["skipped"],
            "quarantined": by_status["quarantined"],
            "scans": len(scans),
        }

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "started": self.started,
            "finished": self.finished,
            "counts": self.counts(),
            "files": [r.to_json() for r in sorted(self.files, key=lambda r: r.path)],
            # Symlinks to folders and broken links: listed, never entered (loops cannot trap us).
            "links_not_followed": sorted(self.links_not_followed),
        }

    def write(self, reports_dir: Path) -> Path:
        self.finished = self.finished or utc_now()
        stamp = self.started.replace("-", "").replace(":", "")
        path = reports_dir / f"ingest-{stamp}.json"
        n = 1
        while path.exists():  # two ingests in the same second keep both reports
            path = reports_dir / f"ingest-{stamp}-{n}.json"
            n += 1
        atomic_write_text(path, json.dumps(self.to_json(), indent=1))
        return path
