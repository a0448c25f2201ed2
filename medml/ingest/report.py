"""The ingest report (a contract, see ARCHITECTURE.md): every source file accounted for.

It is the one place where source paths are written (relative to the source, plus the source
itself); it stays in the workspace. Paths are bytes on POSIX: a name that is not UTF-8 (a
Latin-1 folder of an old PACS export) is reported in a printable form, its undecodable bytes as
``\\xNN`` escapes, so the report, the catalog and the logs can always encode it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

Status = Literal["ingested", "skipped", "quarantined"]


def printable(path: str | os.PathLike) -> str:
    """``path`` as UTF-8-encodable text: valid UTF-8 unchanged, other bytes as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def quarantine_entries(files: list[FileRecord]) -> list[dict[str, str]]:
    """The quarantined files without a source path: each named by its position in the report
    (``#12`` is ``files[12]``), and any report path quoted in its reason (``duplicate of ...``)
    replaced the same way. For the places outside the report that list quarantined files (the
    catalog, Prefect artifacts): folder names of exports name patients as often as not."""
    position = {f.path: i for i, f in enumerate(files)}
    return [
        {"path": f"#{i}", "reason": without_paths(f.reason or "", position)}
        for i, f in enumerate(files)
        if f.status == "quarantined"
    ]


def without_paths(reason: str, position: dict[str, int]) -> str:
    """``reason`` with every report path in it replaced by its ``#position`` (longest first,
    so a folder never leaves part of a file's path behind)."""
    for path in sorted(position, key=len, reverse=True):
        if path in reason:
            reason = reason.replace(path, f"#{position[path]}")
    return reason


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

    def __post_init__(self) -> None:
        self.path = printable(self.path)

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
    special_files: list[str] = field(default_factory=list)  # FIFOs, devices, sockets
    unreadable_folders: list[str] = field(default_factory=list)  # could not be listed

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
            "source": printable(self.source),
            "started": self.started,
            "finished": self.finished,
            "counts": self.counts(),
            "files": [r.to_json() for r in sorted(self.files, key=lambda r: r.path)],
            # Symlinks to folders and broken links: listed, never entered (loops cannot trap us).
            "links_not_followed": sorted(printable(p) for p in self.links_not_followed),
            # Never opened (a read of a FIFO would hang), and folders that could not be listed:
            # their files are not in `files`, so they are named here.
            "special_files": sorted(printable(p) for p in self.special_files),
            "unreadable_folders": sorted(printable(p) for p in self.unreadable_folders),
        }

    def write(self, reports_dir: Path) -> Path:
        self.finished = self.finished or utc_now()
        stamp = self.started.replace("-", "").replace(":", "")
        reports_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".ingest-{stamp}.{os.getpid()}-", dir=reports_dir)
        tmp = Path(name)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(self.to_json(), indent=1))
            return _link_unique(tmp, reports_dir, f"ingest-{stamp}")
        finally:
            tmp.unlink(missing_ok=True)


def _link_unique(tmp: Path, folder: Path, stem: str) -> Path:
    """Give the finished ``tmp`` the first free name ``stem.json``, ``stem-1.json``, ...

    ``os.link`` fails when the name exists, so two ingests finishing in the same second can
    never take the same name (an exists-then-rename check races); the temporary name is then
    removed.
    """
    n = 0
    while True:
        path = folder / (f"{stem}.json" if n == 0 else f"{stem}-{n}.json")
        try:
            os.link(tmp, path)
            return path
        except FileExistsError:
            n += 1
        except OSError:  # a filesystem without hard links: claim the name, then fill it
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                n += 1
                continue
            os.replace(tmp, path)
            return path
