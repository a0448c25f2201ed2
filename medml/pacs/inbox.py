"""The pull inbox: each series is retrieved into a temporary folder, renamed when complete.

``INBOX/.partial/<key>-<random>/`` fills during a retrieve; only a complete retrieve (as many
instances as the PACS listed) is renamed to ``INBOX/<run>/<key>/``, the folder ingestion reads.
A retrieve that fails or comes up short, or a series that grew on the PACS while it was
retrieved (still arriving), is deleted, never ingested. The inbox holds original
DICOM (identifiers included) only while its run lasts: :func:`clear` removes a series once it
is done and :func:`sweep` whatever a killed run left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from medml.pacs.source import PartialRetrieve, SeriesRef, Source

PARTIAL = ".partial"


def pull_series(source: Source, ref: SeriesRef, run_dir: Path, key: str) -> Path:
    """Retrieve ``ref`` into ``run_dir/key`` atomically; raise :class:`PartialRetrieve` if the
    PACS sent fewer instances than it listed (nothing is left behind then)."""
    staging = run_dir.parent / PARTIAL
    staging.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=staging))
    try:
        n = source.retrieve(ref, tmp)
        if n == 0 or (ref.n_instances is not None and n < ref.n_instances):
            listed = "?" if ref.n_instances is None else ref.n_instances
            raise PartialRetrieve(f"series {key}: retrieved {n} of {listed} instances")
        now = source.count(ref)
        if now is not None and now > n:  # still arriving at the PACS: next run takes it whole
            raise PartialRetrieve(f"series {key}: retrieved {n} instances, the PACS has {now} now")
        final = run_dir / key
        run_dir.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clear(folder: Path) -> None:
    """Remove a processed series folder (and its run folder once empty)."""
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):  # other series of the run are still there
        folder.parent.rmdir()


def sweep(inbox: Path, keep: str | None = None) -> int:
    """Remove every run folder but ``keep`` and every partial retrieve; return how many."""
    if not inbox.is_dir():
        return 0
    removed = 0
    for child in inbox.iterdir():
        if child.is_dir() and child.name != keep:
            shutil.rmtree(child, ignore_errors=True)
            removed += 1
    return removed
