"""One writer per workspace: an advisory lock that every writing command holds while it runs.

The lock is ``fcntl.flock`` on ``WS/.lock``; the file holds a small JSON (command, PID, host,
start time) so that a second writer can say who is in the way:
``workspace busy: ingest PID 123 on host since 10:42 UTC``. When the catalog is PostgreSQL
(a catalog several hosts may share), a session-level ``pg_advisory_lock`` on a key derived
from the catalog URL is taken as well, with the same description as the session's
``application_name``, so writers on other hosts are kept out too.

The kernel drops a ``flock`` when its holder dies (kill -9 included) and PostgreSQL drops an
advisory lock with its session, so a killed writer never leaves the workspace locked. The lock
file is never deleted (deleting a ``flock`` file lets two processes lock two different files).

Readers (predict, evaluate) do not take it. The lock is re-entrant within a process (a command
holds it and the library functions it calls take it again for free, from any thread), so it
serialises processes, not threads of one process. Under ``torchrun`` only rank 0 takes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import inspect
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

LOCK_NAME = ".lock"
POLL_S = 0.2  # --wait: how often a waiting writer retries
F = TypeVar("F", bound=Callable[..., Any])


class WorkspaceBusy(RuntimeError):
    """Another process is writing to this workspace."""


@dataclass
class _Held:
    count: int
    fd: int
    pg: Any = None  # the SQLAlchemy connection holding the PostgreSQL advisory lock


_HELD: dict[str, _Held] = {}
_GUARD = threading.RLock()


def lock_file(root: str | Path) -> Path:
    return Path(root) / LOCK_NAME


def holder(root: str | Path) -> dict[str, Any] | None:
    """What the lock file says about the current writer (None if nobody wrote it yet)."""
    try:
        text = lock_file(root).read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def describe(info: dict[str, Any] | None) -> str:
    """``ingest PID 123 on host since 10:42 UTC`` (or a plain phrase without details)."""
    if not info:
        return "another process"
    since = str(info.get("started", ""))
    with contextlib.suppress(ValueError):
        since = datetime.fromisoformat(since.replace("Z", "+00:00")).strftime("%H:%M UTC")
    host = f" on {info['host']}" if info.get("host") else ""
    return f"{info.get('command', '?')} PID {info.get('pid', '?')}{host} since {since}"


def _is_secondary_rank() -> bool:
    """A torchrun worker other than rank 0 (rank 0 holds the lock for the whole job)."""
    return os.environ.get("RANK", "0") != "0" and "LOCAL_RANK" in os.environ


@contextlib.contextmanager
def workspace_lock(
    root: str | Path,
    command: str,
    wait: bool = False,
    catalog_url: str | None = None,
) -> Iterator[None]:
    """Hold the workspace's writer lock for the block; raise :class:`WorkspaceBusy` if another
    process holds it (``wait=False``), or block until it is free (``wait=True``)."""
    root = Path(root).resolve()
    key = str(root)
    if _is_secondary_rank():
        yield
        return
    with _GUARD:  # held while acquiring too: two threads never lock one file twice
        held = _HELD.get(key)
        if held is not None:
            held.count += 1
        else:
            held = _HELD[key] = _acquire(root, command, wait, catalog_url)
    try:
        yield
    finally:
        with _GUARD:
            held.count -= 1
            last = held.count == 0
            if last:
                del _HELD[key]
        if last:
            _release(held)


def writes_workspace(command: str, arg: str = "ws") -> Callable[[F], F]:
    """Decorate a library entry point that writes the workspace passed as ``arg`` (an object
    with ``root`` and ``catalog_url``, a ``medml.workspace.Workspace``): it runs under the
    lock, failing fast with :class:`WorkspaceBusy`. Without a workspace it runs unlocked."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> Any:
            ws = signature.bind_partial(*args, **kwargs).arguments.get(arg)
            if ws is None:
                return fn(*args, **kwargs)
            with workspace_lock(ws.root, command, catalog_url=ws.catalog_url):
                return fn(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate


def _info(command: str) -> dict[str, Any]:
    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
            "started": started}  # fmt: skip


def _acquire(root: Path, command: str, wait: bool, catalog_url: str | None) -> _Held:
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file(root), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    raise WorkspaceBusy(_busy(root, describe(holder(root)))) from None
                time.sleep(POLL_S)
        info = _info(command)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        pg = _pg_lock(catalog_url, info, wait, root) if _is_postgres(catalog_url) else None
    except BaseException:
        with contextlib.suppress(OSError):  # our details, if written, are no one's now
            if holder(root) and holder(root).get("pid") == os.getpid():
                os.ftruncate(fd, 0)
        os.close(fd)  # closing drops the flock too
        raise
    return _Held(1, fd, pg)


def _release(held: _Held) -> None:
    if held.pg is not None:
        with contextlib.suppress(Exception):  # a lost connection has dropped the lock already
            held.pg.close()
            held.pg.engine.dispose()
    with contextlib.suppress(OSError):
        os.ftruncate(held.fd, 0)  # nobody is writing any more
    os.close(held.fd)


def _busy(root: Path, who: str) -> str:
    return (
        f"workspace busy: {who} is writing to {root}; "
        "run again when it has finished, or pass --wait to queue behind it"
    )


# ----------------------------------------------------------------------------- PostgreSQL


def _is_postgres(url: str | None) -> bool:
    return bool(url) and url.split(":", 1)[0].split("+", 1)[0] in {"postgresql", "postgres"}


def advisory_key(url: str) -> int:
    """A signed 64-bit key for ``pg_advisory_lock``, the same for every host using ``url``."""
    digest = hashlib.sha256(f"medml-workspace:{url}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _pg_lock(url: str, info: dict[str, Any], wait: bool, root: Path) -> Any:
    import sqlalchemy as sa

    name = describe(info)[:63]  # application_name is at most 63 bytes
    engine = sa.create_engine(url, connect_args={"application_name": name}, poolclass=sa.NullPool)
    conn = engine.connect()
    key = advisory_key(url)
    try:
        if wait:
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        elif not conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
            raise WorkspaceBusy(_busy(root, _pg_holder(conn, key) + " (shared catalog)"))
        conn.commit()  # the lock is session-level: it outlives this transaction
    except BaseException:
        conn.close()
        engine.dispose()
        raise
    return conn


def _pg_holder(conn: Any, key: int) -> str:
    """The ``application_name`` of the session holding ``key`` (set by :func:`_pg_lock`)."""
    import sqlalchemy as sa

    unsigned = key & 0xFFFFFFFFFFFFFFFF
    row = conn.execute(
        sa.text(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = :hi AND l.objid = :lo "
            "AND l.objsubid = 1"
        ),
        {"hi": unsigned >> 32, "lo": unsigned & 0xFFFFFFFF},
    ).first()
    return row[0] if row and row[0] else "another process"
