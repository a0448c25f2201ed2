"""Progress that suits where the output goes: a bar on a terminal, a few log lines otherwise.

A progress bar redraws with carriage returns; in a log file or a CI console that is one
ever-growing line. Off a terminal, one log line per ``every_percent`` of the work or per
``every_s`` seconds, whichever comes first.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from tqdm.auto import tqdm

log = logging.getLogger("medml.progress")


class Progress:
    """``update(n)`` as work completes; ``close()`` at the end (or use as a context manager)."""

    def __init__(
        self,
        total: int,
        desc: str,
        enabled: bool = True,
        stream: TextIO | None = None,
        every_percent: float = 10.0,
        every_s: float = 60.0,
    ) -> None:
        self.total, self.desc, self.done = total, desc, 0
        stream = stream or sys.stderr
        self.bar = None
        self.log_lines = enabled and not _is_terminal(stream)
        if enabled and not self.log_lines:
            self.bar = tqdm(total=total, desc=desc, unit="scan", file=stream)
        self.step = max(1, int(total * every_percent / 100))
        self.every_s = every_s
        self.start = self.last_time = time.monotonic()
        self.last_done = 0

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.log_lines:
            now = time.monotonic()
            if self.done - self.last_done >= self.step or now - self.last_time >= self.every_s:
                self._line(now)

    def _line(self, now: float) -> None:
        rate = self.done / (now - self.start) if now > self.start else 0.0
        pct = 100 * self.done / self.total if self.total else 100.0
        log.info("%s: %d/%d (%.0f %%), %.1f/s", self.desc, self.done, self.total, pct, rate)
        self.last_done, self.last_time = self.done, now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.log_lines and self.done != self.last_done:
            self._line(time.monotonic())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
