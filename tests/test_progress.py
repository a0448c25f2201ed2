"""Progress reporting (medml.progress): a bar on a terminal, log lines elsewhere (issue 14,
problem 7: bars redrew with carriage returns into log files)."""

import io
import logging

from medml.progress import Progress, track


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "medml.progress"]


def test_a_terminal_gets_a_bar_and_no_log_lines(caplog):
    stream = _Terminal()
    with (
        caplog.at_level(logging.INFO, logger="medml.progress"),
        Progress(10, "convert", stream=stream) as bar,
    ):
        for _ in range(10):
            bar.update(1)
    assert "convert" in stream.getvalue() and "\r" in stream.getvalue()
    assert _lines(caplog) == []


def test_a_log_gets_lines_with_the_postfix(caplog):
    stream = io.StringIO()
    with (
        caplog.at_level(logging.INFO, logger="medml.progress"),
        Progress(4, "convert", stream=stream, every_percent=50) as bar,
    ):
        for i in range(4):
            bar.set_postfix(ingested=i + 1, quarantined=0)
            bar.update(1)
    assert stream.getvalue() == ""
    lines = _lines(caplog)
    assert len(lines) == 2
    assert lines[0].startswith("convert: 2/4 scan (50 %), ")
    assert lines[0].endswith("/s, ingested 2, quarantined 0")
    assert lines[1].startswith("convert: 4/4 scan (100 %), ")
    assert lines[1].endswith("/s, ingested 4, quarantined 0")


def test_a_transient_bar_logs_by_time_only(caplog):
    """An epoch's bar (leave=False) must not write ten lines per epoch into a log."""
    with caplog.at_level(logging.INFO, logger="medml.progress"):
        with Progress(100, "epoch 1", stream=io.StringIO(), unit="batch", leave=False) as bar:
            for _ in range(100):
                bar.update(1)
        assert _lines(caplog) == []
        with Progress(3, "epoch 2", stream=io.StringIO(), leave=False, every_s=0.0) as bar:
            for _ in range(3):
                bar.update(1)
    assert [m.split(",")[0] for m in _lines(caplog)] == ["epoch 2: 1/3 scan (33 %)",
                                                          "epoch 2: 2/3 scan (67 %)",
                                                          "epoch 2: 3/3 scan (100 %)"]  # fmt: skip


def test_track_yields_every_item_and_counts_unknown_totals(caplog):
    with caplog.at_level(logging.INFO, logger="medml.progress"):
        assert list(track(iter(range(5)), "synth", unit="patient")) == [0, 1, 2, 3, 4]
    assert _lines(caplog)[-1].startswith("synth: 5 patient, ")
