"""Progress: a bar in a terminal, plain log lines every ``log_every`` steps otherwise."""

from __future__ import annotations

import io
import logging

from brainseg.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="brainseg.train")
    progress = Progress(total_steps=10, initial=0, log_every=4, stream=io.StringIO())
    for step in range(1, 11):
        progress.update(step, 1, 0.5, 1e-3, 12.0, 0.1)
    progress.close()
    assert [r.getMessage().split()[0] for r in caplog.records] == ["step=4/10", "step=8/10", "step=10/10"]


def test_a_bar_in_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="brainseg.train")
    terminal = Terminal()
    progress = Progress(total_steps=10, initial=2, log_every=4, stream=terminal)
    for step in range(3, 11):
        progress.update(step, 1, 0.5, 1e-3, 12.0, 0.1)
    progress.close()
    assert "10/10" in terminal.getvalue() and "loss=0.5000" in terminal.getvalue()
    assert not caplog.records


def test_silent_on_other_ranks(caplog):
    caplog.set_level(logging.INFO, logger="brainseg.train")
    terminal = Terminal()
    progress = Progress(total_steps=4, initial=0, log_every=1, enabled=False, stream=terminal)
    progress.update(1, 1, 0.5, 1e-3, 12.0, 0.1)
    progress.close()
    assert terminal.getvalue() == "" and not caplog.records
