"""Atomic file writes (a temp file in the same folder, then ``os.replace``) and JSON-safe values.

A crash never leaves a half-written file under its final name. Temporary names carry the
writer's PID (``.<name>.<pid>-<random><suffix>``), so the next run can tell the leftovers of a
killed writer (:func:`remove_stale_temporaries`) from the files of one still writing.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(final: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it over ``final`` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.{os.getpid()}-"
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix or ".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(final: str | Path, text: str) -> None:
    """Write ``text`` to ``final`` atomically."""
    with atomic_path(final) as tmp:
        tmp.write_text(text)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(folder: str | Path, final_names: Iterable[str]) -> list[Path]:
    """Delete the temporaries of :func:`atomic_path` for ``final_names`` in ``folder`` whose
    writer is dead (killed mid-write); return what was deleted. Live writers' files stay."""
    folder = Path(folder)
    removed = []
    for name in final_names:
        for tmp in folder.glob(f".{glob.escape(name)}.*-*"):
            pid = tmp.name[len(name) + 2 :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def jsonable(value: Any) -> Any:
    """Plain JSON types (numpy scalars and paths become floats/ints/strings; NaN becomes None)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    def default(v: Any) -> Any:
        if hasattr(v, "item"):  # numpy scalar
            return v.item()
        return str(v)

    return clean(json.loads(json.dumps(value, default=default)))
