"""Why a training run stops early; train.py turns these into exit codes."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """The run cannot start or continue; the message says what and how to fix it."""


class Interrupted(TrainingError):
    """SIGTERM stopped the run after a checkpoint; the same command resumes it."""
