"""What a run writes under ``<output_uri>/<run_name>/`` (:class:`RunLayout`, the one place its paths
are named, for the job and the tools that read it), uploaded with retries (:class:`RunStore`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable

import numpy as np

from brainseg.io import s3

logger = logging.getLogger(__name__)



class RunLayout:
    """Every path of a run, relative to ``<output_uri>/<run_name>/``."""

    STATUS = "run.json"  # running/finished/failed/interrupted, start time, hyperparameters
    OWNER = "owner.json"  # which job writes this run (brainseg.run.ownership)
    CHECKPOINTS = "checkpoints/"  # training states and their records (brainseg.run.checkpoint)
    METRICS = "metrics/metrics.jsonl"  # one JSON line per epoch
    TEST_CASES = "metrics/test_per_case.csv"  # final test evaluation, one row per case
    MODEL = "model/model.pt"  # best weights and their description (brainseg.model.artifact)
    MODEL_DESCRIPTION = "model/model.json"  # the description alone, readable without torch
    ENCODER = "model/encoder.pt"  # the encoder of an autoencoder run's best weights
    SUMMARY = "summary.json"  # headline results
    LR_FIND = "lr_find.json"  # a learning-rate range test's curve and suggestion (task lr_find)

    @staticmethod
    def checkpoint(name: str) -> str:
        return RunLayout.CHECKPOINTS + name

    @staticmethod
    def prediction(case_id: str) -> str:
        """Image, mask and prediction around the tumour of a test case (a bounded crop)."""
        return f"predictions/{case_id}.npz"


UPLOAD_ATTEMPTS = 3  # on top of botocore's own retries of each request
UPLOAD_BACKOFF_S = 2.0


class RunStore:
    """The artifacts of one run in S3 (``run_name`` empty: directly under ``output_uri``).

    Args:
        before_write: called before every upload; raises to stop writes (a run owned by
            another job, see :mod:`brainseg.run.ownership`).
    """

    def __init__(self, output_uri: str, run_name: str, before_write: Callable[[], None] | None = None):
        self.run_name = run_name
        self.uri = "/".join(part for part in (output_uri.rstrip("/"), run_name) if part) + "/"
        self.before_write = before_write

    def url(self, relative: str) -> str:
        return self.uri + relative

    def put(self, relative: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Upload with retries; raises :class:`s3.S3Error` once every attempt failed."""
        if self.before_write is not None:
            self.before_write()
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                s3.put_bytes(self.url(relative), data, content_type)
                return
            except s3.S3Error as err:
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
            columns = list(dict.fromkeys(name for row in rows for name in row))
            writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        self.put(relative, buffer.getvalue().encode(), "text/csv")

    def put_npz(self, relative: str, arrays: dict) -> None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        self.put(relative, buffer.getvalue())

    def put_metrics(self, history: list[dict]) -> None:
        """Rewrite :attr:`RunLayout.METRICS` with every epoch so far (small: one line per epoch)."""
        text = "".join(json.dumps(line, sort_keys=True) + "\n" for line in history)
        self.put(RunLayout.METRICS, text.encode(), "application/x-ndjson")
