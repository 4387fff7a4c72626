"""Training progress: a tqdm bar in a terminal, plain log lines every ``log_every`` steps otherwise
(SageMaker and CI logs are not terminals and a redrawn bar would flood them)."""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

logger = logging.getLogger("brainseg.train")


class Progress:
    def __init__(self, total_steps: int, initial: int, log_every: int, enabled: bool = True, stream=None):
        stream = stream or sys.stderr
        self.log_every = log_every
        self.enabled = enabled
        self.bar = (tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True, file=stream)
                    if enabled and stream.isatty() else None)
        self.total = total_steps

    def update(self, step: int, epoch: int, loss: float, lr: float, patches_per_s: float, data_wait: float) -> None:
        """Report that optimiser step ``step`` (1-based count) finished."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", lr=f"{lr:.2e}", wait=f"{data_wait:.0%}")
        elif step % self.log_every == 0 or step == self.total:
            logger.info("step=%d/%d epoch=%d loss=%.4f lr=%.3g patches_per_s=%.1f data_wait=%.2f",
                        step, self.total, epoch, loss, lr, patches_per_s, data_wait)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
