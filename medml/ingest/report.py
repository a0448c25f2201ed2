"""The ingest report (a contract, see ARCHITECTURE.md): every source file accounted for.

It is the one place where source paths are written (relative to the source, plus the source
itself); it stays in the workspace. Paths are bytes on POSIX: a name that is not UTF-8 (a
Latin-1 folder of an old PACS export) is reported in a printable form, its undecodable bytes as
``\\xNN`` escapes, so the report, the catalog and the logs can always encode it.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
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
    (``#12`` is ``files[12]``), and the report's paths and file names quoted in its reason
    replaced the same way (:class:`ReportPositions`). For the places outside the report that
    list quarantined files (the catalog, Prefect artifacts): export folders name patients."""
    positions = ReportPositions([f.path for f in files])
    return [
        {"path": f"#{i}", "reason": positions.hide(f.reason or "", near=f.path)}
        for i, f in enumerate(files)
        if f.status == "quarantined"
    ]


_TOKEN = re.compile(r"[^\s,;()\[\]'\"]+")  # a run of characters a path is made of
_BLANK = re.compile(r"\s")


class ReportPositions:
    """Report paths to their positions in the report, to take paths out of a reason.

    A reason may quote a file's path relative to the source (an exception text, once the
    source folder is cut) or a file's name (``duplicate slice position … (IM0004.dcm,
    IM0005.dcm)``). Whole tokens equal to a path, or to a file's name (the one in the quoting
    file's folder first), become ``#position``. Tokens that cannot identify anyone stay, so
    numbers and short words are never rewritten when files happen to be named ``1`` or
    ``SR``: a token is replaced only if it has a ``/`` or ``.``, or 4 characters and a
    non-digit.
    """

    def __init__(self, paths: list[str]) -> None:
        self.position = {p: i for i, p in enumerate(paths)}
        # paths with blanks are not one token: those of the quoting file's folder are matched
        # whole, longest first (long and specific, they hit nothing else)
        self.spaced: dict[str, list[str]] = {}
        for path in sorted(paths, key=len, reverse=True):
            if _BLANK.search(path):
                self.spaced.setdefault(posixpath.dirname(path), []).append(path)
        self.by_name: dict[tuple[str, str], int] = {}
        self.first_by_name: dict[str, int] = {}
        for i, path in enumerate(paths):
            folder, name = posixpath.split(path)
            self.by_name.setdefault((folder, name), i)
            self.first_by_name.setdefault(name, i)

    def hide(self, reason: str, near: str = "") -> str:
        """``reason`` with its path and file-name tokens replaced (``near``: the path of the
        record it belongs to, whose folder a bare name is looked up in first)."""
        folder = posixpath.dirname(near)
        for path in self.spaced.get(folder, []):
            if path in reason:
                whole = rf"(?<![^\s'\"(\[]){re.escape(path)}(?![^\s'\")\],;:])"
                reason = re.sub(whole, f"#{self.position[path]}", reason)

        def swap(match: re.Match[str]) -> str:
            token = match.group(0)
            bare = token.rstrip(".:")
            if not _could_identify(bare):
                return token
            i = self.position.get(bare)
            if i is None:
                i = self.by_name.get((folder, bare), self.first_by_name.get(bare))
            return token if i is None else f"#{i}{token[len(bare) :]}"

        return _TOKEN.sub(swap, reason)


def _could_identify(token: str) -> bool:
    return "/" in token or "." in token or (len(token) >= 4 and not token.isdigit())


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
