"""De-identification keys: patient, study and scan identifiers become keyed hashes (HMAC-SHA256).

The secret comes from ``$MEDML_DEID_SECRET`` or is created once in the workspace with 0600
permissions, so the same patient maps to the same key across runs, and nobody without the
secret can test a guessed identity against a key.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import os
import secrets
from pathlib import Path


def load_secret(secret_file: Path) -> bytes:
    """The de-identification secret: environment first, else the workspace file (created once)."""
    env = os.environ.get("MEDML_DEID_SECRET")
    if env:
        return env.encode()
    if not secret_file.exists():
        _create_once(secret_file, secrets.token_hex(32))
    return secret_file.read_text().strip().encode()


def _create_once(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` unless it exists, atomically: the first writer wins and
    every other (concurrent) first call reads the winner's secret, never a half-written one.

    The text goes to a private temporary file (0600, ``O_EXCL``) that is then hard-linked to
    its final name: ``link`` fails when the name exists, where a rename would replace it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):  # another process created it first
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class KeyMaker:
    """Derives short, stable, non-reversible keys from identifying strings."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def key(self, kind: str, value: str, length: int = 16) -> str:
        """``kind`` separates namespaces, so a patient id and a UID never collide."""
        digest = hmac.new(self._secret, f"{kind}:{value}".encode(), hashlib.sha256)
        return digest.hexdigest()[:length]

    def date_offset_days(self, patient_id: str, max_days: int) -> int:
        """A per-patient shift in ``[-max_days, max_days]``, the same in every run."""
        if max_days <= 0:
            return 0
        digest = hmac.new(self._secret, f"dateshift:{patient_id}".encode(), hashlib.sha256)
        return int.from_bytes(digest.digest()[:8], "big") % (2 * max_days + 1) - max_days


def shift_date(value: str | None, offset_days: int) -> str | None:
    """DICOM ``YYYYMMDD`` shifted by ``offset_days``, as ISO ``YYYY-MM-DD`` (None if unusable).

    PS3.15 Annex E, *Retain Longitudinal Temporal Information with Modified Dates*: intervals
    between one patient's studies survive, the calendar dates do not.
    """
    text = (value or "").strip()
    try:
        day = datetime.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except (ValueError, IndexError):
        return None
    return (day + datetime.timedelta(days=offset_days)).isoformat()
