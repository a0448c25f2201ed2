"""What a conversion error means: a fault of the data (quarantine the input, with a message
that names no header value) or of the environment (stop the run; the input is fine).

A full disk, a quota, a read-only or unwritable workspace are not properties of the input: a
quarantine would hide them behind "bad data" and the rerun would skip healthy files. They stop
the run with a clear message instead; nothing is quarantined for them, and the rerun (with
space freed) converts what is left. A lost database connection surfaces outside the per-series
handlers and stops the run the same way.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

# errnos that are never the input's fault: the workspace cannot take the output
_STORAGE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
# errnos that are the environment's fault when they concern a workspace path
_ACCESS = {errno.EACCES, errno.EPERM}


class EnvironmentFault(RuntimeError):
    """The workspace (disk, permissions) failed: stop the run, quarantine nothing."""


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _under(path: object, root: Path) -> bool:
    if path is None:
        return False
    try:
        return Path(str(path)).resolve().is_relative_to(root.resolve())
    except (OSError, ValueError):
        return False


def environment_fault(exc: BaseException, workspace: Path) -> EnvironmentFault | None:
    """An :class:`EnvironmentFault` describing ``exc`` if it (or its cause) is one, else None."""
    for e in _chain(exc):
        if isinstance(e, EnvironmentFault):
            return e
        if not isinstance(e, OSError) or e.errno is None:
            continue
        on_workspace = _under(e.filename, workspace) or _under(e.filename2, workspace)
        if e.errno in _STORAGE or (e.errno in _ACCESS and on_workspace):
            where = f" writing to the workspace {workspace}"
            return EnvironmentFault(
                f"{e.strerror or errno.errorcode.get(e.errno, e.errno)}{where}: the run stopped "
                "and quarantined nothing for it; free space or fix permissions, then run again"
            )
    return None


def raise_if_environment(exc: BaseException, workspace: Path) -> None:
    """Re-raise ``exc`` as an :class:`EnvironmentFault` when the environment is to blame."""
    fault = environment_fault(exc, workspace)
    if fault is not None:
        raise fault from exc


# Quoted values in exception texts are, in pydicom's and numpy's messages, the offending
# header value ("could not convert string to float: 'DOE^JOHN'"): names, IDs, UIDs. No library
# scrubs its own messages, so this does: every quoted stretch becomes '…'.
_QUOTED = re.compile(r"""b?(['"])(?:(?!\1).)*?\1""", re.S)


def scrub(text: str) -> str:
    """``text`` with every quoted value replaced by ``'…'`` (they may quote header values)."""
    return _QUOTED.sub("'…'", text)
