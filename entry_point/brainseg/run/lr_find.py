"""The learning-rate range test (Smith, 2017): train from the initial weights while the learning
rate grows exponentially from ``lr_find_min`` to ``lr_find_max``, one step each, and record the loss.

The run is the segmentation run its flags describe (same data, network, loss, optimiser, batch),
so the curve is the one that training will see. The sweep stops once the smoothed loss exceeds four
times its minimum (diverged) or is not finite. ``lr_find.json`` in the run folder holds the curve and
two readings of it: the learning rate of the steepest descent of the smoothed loss (the suggestion)
and a tenth of the learning rate at its minimum (the other common rule). Nothing else is trained or
saved: no checkpoints, no model.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from brainseg.io import cache
from brainseg.layout import RunLayout
from brainseg.run import distributed
from brainseg.run.engine import Trainer
from brainseg.run.errors import TrainingError

logger = logging.getLogger("brainseg.train")
SMOOTHING = 0.98  # the exponential moving average's weight of the past (bias-corrected)
DIVERGED = 4.0  # stop once the smoothed loss exceeds this multiple of its minimum
LINE = "lr_find suggested_lr={suggested_lr:.3e} min_loss_lr={min_loss_lr:.3e} steps={steps}"


def schedule(low: float, high: float, steps: int) -> np.ndarray:
    """``steps`` learning rates from ``low`` to ``high``, evenly spaced in log scale."""
    return np.geomspace(low, high, steps)


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """The bias-corrected exponential moving average of ``losses``."""
    average, smoothed = 0.0, []
    for step, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        smoothed.append(average / (1 - beta ** step))
    return smoothed


def suggest(lrs: list[float], smoothed: list[float]) -> dict:
    """The two readings of a curve: the steepest descent of the smoothed loss over log(lr), searched
    before the loss's minimum, and a tenth of the learning rate at the minimum."""
    if len(lrs) < 3:
        raise ValueError(f"{len(lrs)} points: too few to read a slope from (the loss diverged at once; "
                         "lower lr_find_min)")
    lowest = int(np.argmin(smoothed))
    end = max(lowest, 2)
    slopes = np.gradient(np.asarray(smoothed[:end + 1]), np.log(np.asarray(lrs[:end + 1])))
    steepest = int(np.argmin(slopes))
    return {"suggested_lr": float(lrs[steepest]), "min_loss_lr": float(lrs[lowest]) / 10,
            "steepest_step": steepest, "min_loss_step": lowest}


class LRFinder(Trainer):
    """A segmentation run that sweeps the learning rate instead of training to convergence."""

    def sweep(self) -> dict:
        hp = self.hp
        lrs = schedule(hp.lr_find_min, hp.lr_find_max, hp.lr_find_steps)
        batches = iter(self.loader())
        tried, losses = [], []
        best, diverged = math.inf, False
        for step, lr in enumerate(lrs):
            for group in self.optimizer.param_groups:
                group["lr"] = float(lr)
            loss = distributed.mean(self.train_step(next(batches)), self.device)
            self.state.step = step + 1
            if not math.isfinite(loss):
                diverged = True
                break
            tried.append(float(lr))
            losses.append(loss)
            current = smooth(losses)[-1]
            best = min(best, current)
            if step % hp.log_every == 0:
                logger.info("lr_find step %d/%d lr=%.3e loss=%.4f smoothed=%.4f", step + 1, len(lrs), lr, loss,
                            current)
            if current > DIVERGED * best:
                diverged = True
                break
        smoothed = smooth(losses)
        try:
            reading = suggest(tried, smoothed)
        except ValueError as err:
            raise TrainingError(f"lr_find: {err}") from None
        return {"lrs": tried, "losses": losses, "smoothed": smoothed, **reading, "steps": len(tried),
                "diverged": diverged, "lr_find_min": hp.lr_find_min, "lr_find_max": hp.lr_find_max,
                "optimizer": hp.optimizer, "batch_size": hp.batch_size, "world_size": self.world}

    def execute(self) -> dict | None:
        """Build the run, sweep, write ``lr_find.json`` (rank 0) and return it."""
        status = "failed"
        try:
            self.connect()
            self.build()  # each step sets its rate itself, so the run's schedule has no say
            self.write_status("running", epoch=0, step=0)
            result = self.sweep()
            result["seconds"] = time.time() - self.started
            if self.main:
                self.store.put_json(RunLayout.LR_FIND, result)
                self.store.put_json(RunLayout.SUMMARY, {
                    "run_name": self.run_name, "status": "finished", "task": "lr_find",
                    "suggested_lr": result["suggested_lr"], "min_loss_lr": result["min_loss_lr"],
                    "steps": result["steps"], "hyperparameters": self.hp.to_dict(), "seconds": result["seconds"]})
                logger.info("%s", LINE.format(**result))
            self.write_status("finished", epoch=0, step=result["steps"])
            status = "finished"
            return result if self.main else None
        except BaseException as err:
            if self.output_ready and not self.lock.lost:
                self.write_status("failed", error=f"{type(err).__name__}: {err}"[:2000])
            raise
        finally:
            if self.lock is not None:
                self.lock.release(status)
            cache.disable()
            distributed.teardown()
