"""Progress: a bar in a terminal that log lines never share a line with, plain ``progress`` lines
every ``log_every`` steps otherwise, and evaluation phases shown too."""

from __future__ import annotations

import io
import logging
import re
import sys

from brainseg.progress import Progress, duration_text

VALUES = {"epoch": 1, "loss": 0.5, "lr": 1e-3, "patches_per_s": 12.0, "data_wait_fraction": 0.1}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="brainseg.train")
    with Progress(total=10, log_every=4, stream=io.StringIO()) as progress:
        for step in range(1, 11):
            progress.update(step, **VALUES)
    assert [r.getMessage() for r in caplog.records][0] == ("progress phase=train step=4/10 epoch=1 loss=0.5000 "
                                                          "lr=0.001 patches_per_s=12.0 data_wait_fraction=0.10 eta=0s")
    assert [r.getMessage().split()[2] for r in caplog.records] == ["step=4/10", "step=8/10", "step=10/10"]


def test_the_eta_is_the_remaining_units_at_the_rate_so_far(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="brainseg.train")
    clock = iter([1000.0, 1000.0 + 4 * 30.0, 1000.0 + 8 * 30.0])  # 30 s per step after a resume at step 2
    monkeypatch.setattr("brainseg.progress.time.monotonic", lambda: next(clock))
    with Progress(total=200, initial=2, log_every=2, stream=io.StringIO()) as progress:
        progress.update(6, **VALUES)
        progress.update(10, **VALUES)
    assert [r.getMessage().rsplit(" ", 1)[1] for r in caplog.records] == ["eta=1h37m", "eta=1h35m"]
    assert [duration_text(s) for s in (0.4, 59.6, 61, 3599, 3600, 7322)] == ["0s", "1m00s", "1m01s", "59m59s",
                                                                         "1h00m", "2h02m"]


def test_a_bar_in_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="brainseg.train")
    terminal = Terminal()
    with Progress(total=10, initial=2, log_every=4, stream=terminal) as progress:
        for step in range(3, 11):
            progress.update(step, **VALUES)
    assert "10/10" in terminal.getvalue() and "loss=0.5000" in terminal.getvalue()
    assert not caplog.records


def test_log_lines_never_land_on_the_bars_line(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    handler = logging.StreamHandler(sys.stdout)
    monkeypatch.setattr(logging.root, "handlers", [handler])
    log = logging.getLogger("brainseg.test-progress")
    log.setLevel(logging.INFO)
    with Progress(total=4, log_every=1, stream=terminal) as progress:
        progress.update(1, **VALUES)
        with Progress(total=2, phase="val", unit="case", log_seconds=30, stream=terminal) as validation:
            validation.update(1)
            log.info("a message while two bars are shown")
            validation.update(2)
        progress.update(2, **VALUES)
    pieces = re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", terminal.getvalue()))  # cursor moves
    assert "a message while two bars are shown" in pieces, pieces
    assert any(piece.startswith("val: ") and "1/2" in piece for piece in pieces), pieces
    assert logging.root.handlers == [handler]


def test_evaluation_logs_at_most_every_log_seconds_without_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="brainseg.train")
    with Progress(total=3, phase="test", unit="case", log_seconds=1e-9, stream=io.StringIO()) as progress:
        for case in range(1, 4):
            progress.update(case)
    assert [r.getMessage() for r in caplog.records] == [f"progress phase=test case={n}/3 eta=0s" for n in (1, 2, 3)]
    caplog.clear()
    with Progress(total=3, phase="val", unit="case", log_seconds=3600, stream=io.StringIO()) as progress:
        for case in range(1, 4):
            progress.update(case)
    assert not caplog.records


def test_silent_on_other_ranks(caplog):
    caplog.set_level(logging.INFO, logger="brainseg.train")
    terminal = Terminal()
    with Progress(total=4, log_every=1, enabled=False, stream=terminal) as progress:
        progress.update(1, **VALUES)
    assert terminal.getvalue() == "" and not caplog.records
