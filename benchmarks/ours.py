"""Our pipeline as the benchmarks run it: ``entry_point/train.py`` in its own process on a dataset
in the embedded S3 (its local cache empty at start, as on a fresh instance), and the model it
wrote as a member for benchmarks/scoring.py (its own network, window, normalisation and grid)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scoring import Member

from brainseg.data.transforms import normalize
from brainseg.io import s3
from brainseg.layout import RunLayout
from brainseg.model.artifact import LoadedModel, load_model

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_FIELDS = ("best_val_dice", "best_epoch", "test_dice_mean", "test_lesion_dice", "postprocessing", "lesion_wise")


def train(name: str, dataset: str, output_uri: str, model_dir: Path, flags: list[str]) -> dict:
    """train.py on ``dataset`` writing run ``name`` under ``output_uri`` and its model into
    ``model_dir``: the wall time, the loaded model, the summary's headline fields and the validation
    record postprocessing was chosen from (to try other rules on it afterwards).

    Raises:
        RuntimeError: the run failed (its output's tail).
    """
    command = [sys.executable, str(ROOT / "entry_point" / "train.py"), "--data-uri", dataset, "--output-uri", output_uri,
               "--run-name", name, *flags]
    started = time.perf_counter()
    child = subprocess.run(command, capture_output=True, text=True,
                           env=dict(os.environ, SM_MODEL_DIR=str(model_dir), BRAINSEG_CACHE_DIR=str(model_dir / "cache")))
    seconds = round(time.perf_counter() - started, 1)
    print("\n".join(line for line in child.stdout.splitlines() if any(
        tag in line for tag in ("epoch_metrics", "test_metrics", "postprocessing", "target spacing"))), flush=True)
    if child.returncode != 0:
        raise RuntimeError(f"run {name} failed:\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}")
    run = f"{output_uri.rstrip('/')}/{name}/"
    summary = json.loads(s3.read_uri(run + RunLayout.SUMMARY))
    record = s3.read_uri(run + RunLayout.VALIDATION_MATCHES)
    return {"wall_seconds": seconds, "loaded": load_model(str(model_dir), torch.device("cpu")),
            "summary": {key: summary.get(key) for key in SUMMARY_FIELDS},
            "validation_record": json.loads(record) if record else None}


def member(loaded: LoadedModel, flips: tuple = ((),)) -> Member:
    """A trained model of ours as a scoring member (averaged over the mirrored copies ``flips``); a
    study must carry its catalog ``case`` (the intensity statistics our normalisation uses)."""
    description = loaded.description

    def normalise(study: dict) -> np.ndarray:
        return np.stack([normalize(channel.astype(np.float32), description.normalization, stats)
                         for channel, stats in zip(study["image"], study["case"].summary.intensities)])

    return Member(loaded.network, description.patch_size, normalise, description.target_spacing,
                  description.resampling, flips)


def decide(loaded: LoadedModel) -> Callable[[np.ndarray], np.ndarray]:
    """How our prediction turns probabilities into regions (:meth:`brainseg.labels.LabelScheme.predicted`)."""
    return lambda probabilities: np.stack(loaded.description.scheme.predicted(probabilities, probabilities=True))
