"""The training state a checkpoint holds (:func:`checkpoint_bytes`, the loop's :class:`LoopState`),
as tensors and plain values only: what ``torch.load(weights_only=True)`` reads, so a file someone
else could write (a checkpoint, ``--init-weights``) cannot run code. Also the global RNGs (seeded,
saved and restored) and the code version a run records.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from brainseg.config import Hyperparameters
from brainseg.io import s3
from brainseg.io.cache import IO_FIELDS
from brainseg.model.artifact import load_tensors
from brainseg.run.errors import TrainingError

CODE_ROOT = Path(__file__).resolve().parents[2]  # entry_point/: train.py and brainseg/
CHECKPOINT_FORMAT = 2  # 2: RNG states as tensors and plain values, loadable with weights_only=True


def checkpoint_bytes(*, hyperparameters: dict, model: dict, optimizer: dict, scheduler: dict, scaler: dict,
                     best_model: dict, state: dict, rng: list, sampler: dict, dataset_fingerprint: str, splits: dict,
                     code_version: str) -> bytes:
    """A checkpoint: these keys and ``format``, nothing else (:data:`CHECKPOINT_KEYS` is this list).
    ``rng`` holds every rank's :func:`rng_states`; ``sampler`` where the patch stream resumes;
    ``best_model`` the weights the model keeps (the best validation's, or with ``--keep-weights
    last`` the latest validation's)."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "hyperparameters": hyperparameters, "model": model,
                "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "best_model": best_model,
                "state": state, "rng": rng, "sampler": sampler, "dataset_fingerprint": dataset_fingerprint,
                "splits": splits, "code_version": code_version}, buffer)
    return buffer.getvalue()


CHECKPOINT_KEYS = frozenset({"format", *inspect.signature(checkpoint_bytes).parameters})


def configure_determinism(hp: Hyperparameters) -> None:
    random.seed(hp.seed)
    np.random.seed(hp.seed % 2**32)
    torch.manual_seed(hp.seed)
    torch.backends.cudnn.benchmark = not hp.deterministic
    if hp.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def rng_states() -> dict:
    """Every global RNG state as tensors and plain values (what ``torch.load(weights_only=True)`` reads)."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    saved = states["numpy"]
    np.random.set_state((saved["name"], saved["keys"].numpy().astype(np.uint32), saved["position"],
                         saved["has_gauss"], saved["gauss"]))
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available() and states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def load_checkpoint(data: bytes) -> dict:
    """A checkpoint's training state, checked for the format and keys this code writes."""
    checkpoint = load_tensors(data, "the checkpoint")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"checkpoint format {found!r}; this code reads format {CHECKPOINT_FORMAT}")
    missing = sorted(CHECKPOINT_KEYS - checkpoint.keys())
    if missing:
        raise ValueError(f"checkpoint lacks {', '.join(missing)}")
    return checkpoint


def read_weights(location: str) -> dict:
    """A state dict from ``s3://…`` or a path: a checkpoint, an encoder file, a model file or a bare
    state dict."""
    try:
        if location.startswith("s3://"):
            data = s3.read_uri(location)
            if data is None:
                raise TrainingError(f"init_weights {location}: no such object")
        else:
            data = Path(location).read_bytes()
        payload = load_tensors(data, f"init_weights {location}")
    except OSError as err:
        raise TrainingError(f"init_weights {location}: cannot be read: {err}") from err
    except ValueError as err:
        raise TrainingError(str(err)) from err
    for key in ("model", "encoder", "state_dict"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            return payload[key]
    if isinstance(payload, dict) and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return payload
    raise TrainingError(f"init_weights {location}: expected a state dict, a checkpoint or an encoder file")


@dataclass
class LoopState:
    """The loop's counters and early-stopping state (saved in every checkpoint)."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimiser steps
    best_metric: float = -math.inf  # val Dice, or minus the val loss for the autoencoder
    best_epoch: int = 0
    kept_epoch: int = 0  # the epoch whose weights the model keeps (--keep-weights)
    stale: int = 0  # validations since the best one
    stopped_early: bool = False
    history: list = field(default_factory=list)  # the metrics lines so far
    epoch_loss: float = 0.0  # sums over the current epoch's finished steps
    epoch_steps: int = 0
    epoch_wait: float = 0.0
    epoch_seconds: float = 0.0
    epoch_io: list = field(default_factory=lambda: [0] * len(IO_FIELDS))  # the training reads (IO_FIELDS)


@functools.cache
def code_version() -> str:
    """SHA-256 (first 12 hex digits) of the entry point's Python sources as they were when first
    asked (what this process runs), with or without git."""
    digest = hashlib.sha256()
    for path in sorted(CODE_ROOT.rglob("*.py")):
        digest.update(path.relative_to(CODE_ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]
