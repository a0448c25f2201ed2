"""What every PACS client offers: search for series, retrieve one, store instances.

A :class:`SeriesRef` carries original UIDs: it lives in memory for one run and is never
written anywhere (the ledger and reports use :func:`series_key`, a keyed hash).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from pydicom.dataset import Dataset

from medml.ingest.deid import KeyMaker
from medml.pacs.config import PacsConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
# dicomweb-client logs the UIDs of each retrieve at INFO, pynetdicom the query identifiers
# (patient attributes included): logs leave the hospital's systems, so only their warnings do.
for _name in ("dicomweb_client", "pynetdicom"):
    logging.getLogger(_name).setLevel(logging.WARNING)
UID = re.compile(r"\b\d+(?:\.\d+){3,}\b")  # a DICOM UID (in URLs of WADO-RS errors, ...)


def redact(text: str) -> str:
    """``text`` without DICOM UIDs: error messages go to logs, the ledger and reports."""
    return UID.sub("<uid>", text)


class PacsError(RuntimeError):
    """The PACS refused a request or answered something unusable."""


class PacsUnavailable(PacsError):
    """The PACS cannot be reached (down, refusing associations, timing out) after retries."""


class PartialRetrieve(PacsError):
    """A retrieve ended with fewer instances than the PACS listed: the series is not complete."""


@dataclass(frozen=True)
class SeriesRef:
    """One series found on the PACS (original UIDs: in memory only)."""

    study_uid: str
    series_uid: str
    modality: str
    study_date: str  # YYYYMMDD, or "" when the PACS has none
    n_instances: int | None  # as listed by the PACS (None: not listed)


def series_key(keys: KeyMaker, series_uid: str) -> str:
    """The de-identified key of a series: the scan id ingestion gives its (single) volume."""
    return keys.key("series", series_uid)


class Source(Protocol):
    """A PACS client."""

    def search(self, since: str) -> list[SeriesRef]:
        """Series of the configured modalities in studies dated ``since`` (YYYYMMDD) or later."""
        ...

    def count(self, ref: SeriesRef) -> int | None:
        """How many instances the PACS lists for ``ref`` now (None: it does not say)."""
        ...

    def retrieve(self, ref: SeriesRef, folder: Path) -> int:
        """Write every instance of ``ref`` into ``folder``; return how many."""
        ...

    def store(self, datasets: Sequence[Dataset]) -> None:
        """Send ``datasets`` (e.g. SRs) to the PACS."""
        ...


def with_retries(
    what: str,
    call: Callable[[], T],
    cfg: PacsConfig,
    transient: tuple[type[BaseException], ...],
) -> T:
    """Run ``call``; on a ``transient`` error retry ``cfg.retries`` times with doubling delays,
    then raise :class:`PacsUnavailable` naming ``what`` and the last error."""
    delay = cfg.retry_backoff_s
    for attempt in range(cfg.retries + 1):
        try:
            return call()
        except transient as exc:
            reason = redact(f"{type(exc).__name__}: {exc}")
            if attempt == cfg.retries:
                raise PacsUnavailable(
                    f"PACS {cfg.name} unavailable: {what} failed {attempt + 1} times; "
                    f"last error: {reason}"
                ) from None  # the chained error's text would name the UIDs again
            log.warning("PACS %s: %s failed (%s); retry in %.1fs", cfg.name, what, reason, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def write_instances(datasets: Iterable[Dataset], folder: Path, start: int = 0) -> int:
    """Write datasets as numbered files (``000001.dcm``: names that identify nobody)."""
    n = start
    for ds in datasets:
        n += 1
        ds.save_as(folder / f"{n:06d}.dcm", enforce_file_format=True)
    return n - start


def open_source(cfg: PacsConfig) -> Source:
    """The client for ``cfg.protocol``."""
    if cfg.protocol == "dicomweb":
        from medml.pacs.dicomweb import DicomwebSource

        return DicomwebSource(cfg)
    from medml.pacs.dimse import DimseSource

    return DimseSource(cfg)


def open_sender(cfg: PacsConfig) -> Source:
    """The client that sends SRs back (``cfg.sender``), which may differ from the query one."""
    protocol = "dicomweb" if cfg.sender == "stow" else "dimse"
    return open_source(cfg.model_copy(update={"protocol": protocol}))
