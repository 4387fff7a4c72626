"""Progress of a phase (training steps, validation or test cases): a tqdm bar in a terminal, plain
``progress`` log lines otherwise (SageMaker and CI logs are not terminals and a redrawn bar would
flood them).

While a bar is shown, log records go through ``tqdm.write`` so a log line never lands on the
bar's line.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from brainseg.metric_lines import PROGRESS

logger = logging.getLogger("brainseg.train")


def duration_text(seconds: float) -> str:
    """``1h02m``, ``4m05s`` or ``12s``."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """``total`` units (``step`` or ``case``) of one phase (``train``, ``val`` or ``test``).

    Without a terminal a ``progress`` line is logged every ``log_every`` units (training steps)
    or, with ``log_seconds``, at most that often (evaluation: short phases log nothing), with the
    time the phase's remaining units take at its rate so far (``eta``; for training this includes
    the validations, which run inside the phase).
    """

    def __init__(self, total: int, initial: int = 0, *, phase: str = "train", unit: str = "step",
                 log_every: int = 0, log_seconds: float = 0.0, enabled: bool = True, stream=None):
        stream = stream or sys.stderr
        self.total, self.phase, self.unit = total, phase, unit
        self.log_every, self.log_seconds = log_every, log_seconds
        self.enabled = enabled
        self.last_line = self.started = time.monotonic()
        self.initial = initial
        self.redirect = contextlib.ExitStack()
        self.bar = None
        if enabled and stream.isatty():
            self.redirect.enter_context(logging_redirect_tqdm())
            self.bar = tqdm(total=total, initial=initial, unit=unit, desc=phase, dynamic_ncols=True, file=stream,
                            leave=phase == "train")

    def update(self, done: int, **values) -> None:
        """Unit ``done`` (1-based count) finished; ``values`` (``PROGRESS`` fields) describe it."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix({name: f"{value:{spec}}" for name, spec in PROGRESS.fields
                                  if (value := values.get(name)) is not None})
            return
        now = time.monotonic()
        due = (self.log_every and (done % self.log_every == 0 or done == self.total)) or \
            (self.log_seconds and now - self.last_line >= self.log_seconds)
        if due:
            self.last_line = now
            values = {**values, "phase": self.phase, self.unit: f"{done}/{self.total}"}
            if done > self.initial:
                values["eta"] = duration_text((now - self.started) / (done - self.initial) * (self.total - done))
            logger.info("%s", PROGRESS.format(values))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.redirect.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
