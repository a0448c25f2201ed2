"""Progress that suits where the output goes: a bar on a terminal, a few log lines otherwise.

A progress bar redraws with carriage returns; in a log file, a CI console or a Prefect log
that is one ever-growing line. Off a terminal, :class:`Progress` writes one log line per
``every_percent`` of the work or per ``every_s`` seconds, whichever comes first (a transient
bar, ``leave=False`` such as one training epoch, only per ``every_s``: the epoch's own log line
says the rest). Every long loop of the library (ingest, synth, import, train, pretrain,
predict) reports through it.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

from tqdm import tqdm

log = logging.getLogger("medml.progress")
T = TypeVar("T")


class Progress:
    """``update(n)`` as work completes; ``close()`` at the end (or use as a context manager).

    ``total`` may be ``None`` (unknown): log lines then give the count and rate only.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        enabled: bool = True,
        stream: TextIO | None = None,
        unit: str = "scan",
        leave: bool = True,
        every_percent: float = 10.0,
        every_s: float = 60.0,
    ) -> None:
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        stream = stream or sys.stderr
        self.bar = None
        self.log_lines = enabled and not _is_terminal(stream)
        if enabled and not self.log_lines:
            self.bar = tqdm(total=total, desc=desc, unit=unit, file=stream, leave=leave)
        by_percent = leave and total is not None and total > 0
        self.step = max(1, int(total * every_percent / 100)) if by_percent else None
        self.every_s = every_s
        self.leave = leave
        self.postfix: dict[str, Any] = {}
        self.start = self.last_time = time.monotonic()
        self.last_done = 0

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.log_lines:
            now = time.monotonic()
            due = self.step is not None and self.done - self.last_done >= self.step
            if due or now - self.last_time >= self.every_s:
                self._line(now)

    def set_postfix(self, **values: Any) -> None:
        """Figures shown after the bar (or at the end of the next log line): loss, counts."""
        self.postfix = values
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def _line(self, now: float) -> None:
        rate = self.done / (now - self.start) if now > self.start else 0.0
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        if self.total:
            pct = 100 * self.done / self.total
            log.info("%s: %d/%d %s (%.0f %%), %.1f/s%s", self.desc, self.done, self.total,
                     self.unit, pct, rate, extra)  # fmt: skip
        else:
            log.info("%s: %d %s, %.1f/s%s", self.desc, self.done, self.unit, rate, extra)
        self.last_done, self.last_time = self.done, now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.log_lines and self.leave and self.done != self.last_done:
            self._line(time.monotonic())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(
    items: Iterable[T],
    desc: str,
    total: int | None = None,
    enabled: bool = True,
    unit: str = "scan",
    leave: bool = True,
) -> Iterator[T]:
    """``items``, reporting progress as each is consumed (``total``: ``len(items)`` if it has
    one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, desc, enabled=enabled, unit=unit, leave=leave) as bar:
        for item in items:
            yield item
            bar.update(1)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
