"""Prediction inputs: expand the paths a user gives into scans, in their order, one row each.

Walked as ingestion walks a source (``os.walk`` without following links): a folder given on
the command line is entered (even through a link: the user named it), but links to folders
found inside it are never followed, so ``loop -> .`` cannot multiply or hang the inputs. Every
path given is accounted for: each scan found is one input, and what yields no scan (a path that
does not exist, an empty or unreadable folder, a link to a folder) is one input with an error,
so the prediction file shows it. Order: the order given; inside a folder, entries by name.

Error texts never contain a path or a header value (they travel to logs and Prefect
artifacts): :func:`scrub` removes them from exception messages.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from medml.ingest.nifti import is_nifti_name


@dataclass(frozen=True)
class Input:
    """One prediction input: the path as given (or as found under a given folder), and why it
    cannot be predicted when that is known before reading it."""

    path: str
    error: str | None = None


DOES_NOT_EXIST = "does not exist"
FOLDER_LINK = "a link to a folder inside an input folder: not followed"
NO_SCANS = "folder holds no NIfTI file or DICOM series"


def discover_inputs(paths: list[str | Path]) -> list[Input]:
    """NIfTI files and DICOM series folders under ``paths``, in input order (see module doc)."""
    found: list[Input] = []
    for given in paths:
        text = os.fspath(given)
        if os.path.isdir(text):
            found.extend(_walk_folder(text, top=True))
        elif not os.path.lexists(text):
            found.append(Input(text, DOES_NOT_EXIST))
        else:
            found.append(Input(text))  # a file: read (or refused) when predicted
    return found


def _walk_folder(folder: str, top: bool = False) -> list[Input]:
    """A folder's scans: itself first when it holds files and no NIfTI (a DICOM series), then
    its entries by name: NIfTI files, subfolders (walked), links to folders (not followed)."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        return [Input(folder, f"folder cannot be read ({_os_reason(exc)})")]
    files = [e for e in entries if not e.is_dir() and e.is_file()]
    nifti = any(is_nifti_name(Path(e.name)) for e in files)
    out: list[Input] = [Input(folder)] if files and not nifti else []  # a series folder
    for e in entries:
        path = os.path.join(folder, e.name)
        if e.is_symlink() and e.is_dir():
            out.append(Input(path, FOLDER_LINK))
        elif e.is_dir(follow_symlinks=False):
            out.extend(_walk_folder(path))
        elif e.is_file() and is_nifti_name(Path(e.name)):
            out.append(Input(path))
    if top and not out:
        out.append(Input(folder, NO_SCANS))
    return out


def _os_reason(exc: OSError) -> str:
    """An OS error's reason without its file name."""
    return (exc.strerror or type(exc).__name__).lower()


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_PATHLIKE = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?[/\\][^\s:;,'\"]+")


def scrub(message: str, *paths: str) -> str:
    """``message`` without the given paths, other path-like tokens or quoted values (which may
    be header text such as a patient's name)."""
    for p in sorted({q for q in paths if q}, key=len, reverse=True):
        message = message.replace(p, "<input>")
    message = re.sub(r"^<input>:\s*", "", message)
    message = _QUOTED.sub("<value>", message)
    return _PATHLIKE.sub("<path>", message).strip(" :")


def describe_error(exc: BaseException, path: str) -> str:
    """A scrubbed, one-line reason for an input that could not be predicted."""
    if isinstance(exc, FileNotFoundError):
        return DOES_NOT_EXIST
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {_os_reason(exc)}"
    text = str(exc).splitlines()[0] if str(exc) else ""
    resolved = os.path.abspath(path)
    reason = scrub(text, path, resolved, os.path.realpath(path))
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
