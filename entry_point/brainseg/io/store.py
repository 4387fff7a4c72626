"""Writing artifacts under one S3 prefix with retries on top of botocore's (:class:`Store`): what a
training run and a prediction job upload. Where each artifact goes is :mod:`brainseg.layout`'s.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable

import numpy as np

from brainseg.io import s3

logger = logging.getLogger(__name__)

UPLOAD_ATTEMPTS = 3  # on top of botocore's own retries of each request
UPLOAD_BACKOFF_S = 2.0


class Store:
    """Artifacts under one S3 prefix, ``<output_uri>/<name>/`` (``name`` empty: ``output_uri`` itself):
    a training run's folder or a prediction output.

    Args:
        before_write: called before every upload; raises to stop writes (a run owned by
            another job, see :mod:`brainseg.run.ownership`).
    """

    def __init__(self, output_uri: str, name: str, before_write: Callable[[], None] | None = None):
        self.name = name
        self.uri = "/".join(part for part in (output_uri.rstrip("/"), name) if part) + "/"
        self.before_write = before_write

    def url(self, relative: str) -> str:
        return self.uri + relative

    def put(self, relative: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Upload with retries; raises :class:`s3.S3Error` once every attempt failed."""
        if self.before_write is not None:
            self.before_write()
        uri = self.url(relative)
        s3.retrying(lambda: s3.put_bytes(uri, data, content_type), lambda attempts, err: f"{err} ({attempts} attempts)",
                    attempts=UPLOAD_ATTEMPTS, retry_on=(s3.S3Error,), backoff_s=UPLOAD_BACKOFF_S,
                    note=lambda attempt, err: logger.warning("upload of %s failed (attempt %d of %d), retrying: %s",
                                                             uri, attempt, UPLOAD_ATTEMPTS, err))

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

    def put_jsonl(self, relative: str, rows: list[dict]) -> None:
        """One JSON object per line (a run's epoch lines: small, so rewritten whole)."""
        text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
        self.put(relative, text.encode(), "application/x-ndjson")
