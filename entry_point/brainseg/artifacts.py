"""What a run writes under ``<output_uri>/<run_name>/`` and how it finds its newest checkpoint.

Layout::

    run.json                    status (running/finished/failed/interrupted), start time, hyperparameters
    checkpoints/step-00000500.pt   full training state (see brainseg.training)
    checkpoints/latest.json     pointer to the newest complete checkpoint (written after it)
    metrics/metrics.jsonl       one JSON line per epoch
    metrics/test_per_case.csv   final test evaluation, one row per case
    model/model.pt              best weights (and model/encoder.pt for autoencoder runs)
    predictions/<case>.npz      test cases: image, mask and prediction around the tumour (bounded crop)
    summary.json                headline results

Checkpoints are also mirrored to a local directory (``/opt/ml/checkpoints`` on SageMaker, which
the platform syncs to S3 across spot interruptions). A pointer is only written once its
checkpoint is complete in that store, and carries the checkpoint's size and SHA-256, so a reader
never resumes from a partial upload.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from brainseg import s3io

logger = logging.getLogger(__name__)

POINTER = "latest.json"
UPLOAD_ATTEMPTS = 3  # on top of botocore's own retries of each request
UPLOAD_BACKOFF_S = 2.0


class CheckpointError(RuntimeError):
    """A checkpoint pointer names a checkpoint that is missing or does not match its checksum."""


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


class RunStore:
    """The artifacts of one run in S3 (and its local checkpoint mirror, if any)."""

    def __init__(self, output_uri: str, run_name: str, local_checkpoint_dir: str | None = None):
        self.uri = f"{output_uri.rstrip('/')}/{run_name}/"
        self.local = Path(local_checkpoint_dir) if local_checkpoint_dir else None

    def url(self, relative: str) -> str:
        return self.uri + relative

    def put(self, relative: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Upload with retries; raises :class:`s3io.S3Error` once every attempt failed."""
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                s3io.put_bytes(self.url(relative), data, content_type)
                return
            except s3io.S3Error as err:
                if attempt == UPLOAD_ATTEMPTS:
                    raise
                logger.warning("upload of %s failed (attempt %d of %d), retrying: %s",
                               self.url(relative), attempt, UPLOAD_ATTEMPTS, err)
                time.sleep(UPLOAD_BACKOFF_S * attempt)

    def put_json(self, relative: str, value) -> None:
        self.put(relative, json.dumps(value, indent=1, sort_keys=True).encode(), "application/json")

    def put_csv(self, relative: str, rows: list[dict]) -> None:
        buffer = io.StringIO()
        if rows:
            writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        self.put(relative, buffer.getvalue().encode(), "text/csv")

    def put_npz(self, relative: str, arrays: dict) -> None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        self.put(relative, buffer.getvalue())

    def put_metrics(self, history: list[dict]) -> None:
        """Rewrite ``metrics/metrics.jsonl`` with every epoch so far (small: one line per epoch)."""
        text = "".join(json.dumps(line, sort_keys=True) + "\n" for line in history)
        self.put("metrics/metrics.jsonl", text.encode(), "application/x-ndjson")

    def save_checkpoint(self, data: bytes, step: int, epoch: int, keep: int) -> str:
        """Store a checkpoint, then its pointer; prune all but the newest ``keep``. Returns its name.

        The S3 pointer is written only after the checkpoint upload succeeded; if the upload fails
        the previous pointer stays and :class:`s3io.S3Error` propagates.
        """
        name = f"step-{step:08d}.pt"
        pointer = {"checkpoint": name, "step": step, "epoch": epoch, "bytes": len(data),
                   "sha256": hashlib.sha256(data).hexdigest(), "written": time.time()}
        pointer_bytes = json.dumps(pointer, indent=1).encode()
        if self.local is not None:
            _atomic_write(self.local / name, data)
            _atomic_write(self.local / POINTER, pointer_bytes)
        self.put(f"checkpoints/{name}", data)
        self.put(f"checkpoints/{POINTER}", pointer_bytes, "application/json")
        self._prune(keep)
        return name

    def _prune(self, keep: int) -> None:
        bucket, key = s3io.parse_uri(self.url("checkpoints/"))
        names = sorted(info.key.rsplit("/", 1)[1] for info in s3io.list_objects(bucket, key)
                       if info.key.endswith(".pt") and info.key.rsplit("/", 1)[1].startswith("step-"))
        for name in names[:-keep]:
            s3io.delete(self.url(f"checkpoints/{name}"))
        if self.local is not None:
            for path in sorted(self.local.glob("step-*.pt"))[:-keep]:
                path.unlink(missing_ok=True)

    def _read_pointer_s3(self) -> dict | None:
        data = s3io.read_uri(self.url(f"checkpoints/{POINTER}"))
        return json.loads(data) if data is not None else None

    def _read_pointer_local(self) -> dict | None:
        if self.local is None or not (self.local / POINTER).is_file():
            return None
        return json.loads((self.local / POINTER).read_bytes())

    def latest_checkpoint(self) -> tuple[bytes, dict] | None:
        """``(checkpoint bytes, pointer)`` of the newest complete checkpoint in S3 or the local
        mirror, or ``None`` for a new run.

        Raises:
            CheckpointError: every pointer found names a missing or corrupt checkpoint.
        """
        candidates = []
        for source, read_pointer, read_data in (
                ("s3", self._read_pointer_s3, lambda name: s3io.read_uri(self.url(f"checkpoints/{name}"))),
                ("local", self._read_pointer_local,
                 lambda name: (self.local / name).read_bytes() if (self.local / name).is_file() else None)):
            pointer = read_pointer()
            if pointer is not None:
                candidates.append((pointer["step"], source, pointer, read_data))
        problems = []
        for _step, source, pointer, read_data in sorted(candidates, key=lambda c: c[0], reverse=True):
            data = read_data(pointer["checkpoint"])
            if data is None:
                problems.append(f"{source}: {pointer['checkpoint']} is missing")
            elif hashlib.sha256(data).hexdigest() != pointer["sha256"]:
                problems.append(f"{source}: {pointer['checkpoint']} does not match its SHA-256")
            else:
                return data, dict(pointer, source=source)
        if problems:
            raise CheckpointError(f"no usable checkpoint for {self.uri}: {'; '.join(problems)}; "
                                  "start a new run (another --run-name) or restore the checkpoint")
        return None
