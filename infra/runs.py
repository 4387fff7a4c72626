"""Reading what training runs wrote to S3, tolerant of runs still going or cut short.

A run is a folder ``<output-uri>/<run>/`` holding ``run.json`` (see ``brainseg.artifacts``). Every
artifact is read on its own; one that is missing or malformed becomes a line in
``Run.problems``, never an exception, so a half-written or failed run can still be reviewed.
``metrics.jsonl`` is streamed line by line, so a running job's file is read as far as it goes.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from brainseg import s3io


@dataclass
class Run:
    name: str
    uri: str
    status: str = "unknown"
    started: float | None = None
    error: str = ""
    hyperparameters: dict = field(default_factory=dict)
    summary: dict | None = None
    metrics: list = field(default_factory=list)
    per_case: list = field(default_factory=list)
    problems: list = field(default_factory=list)

    @property
    def started_text(self) -> str:
        if self.started is None:
            return "?"
        return datetime.fromtimestamp(self.started, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    @property
    def best_val_dice(self) -> float | None:
        if self.summary and self.summary.get("best_val_dice") is not None:
            return self.summary["best_val_dice"]
        scores = [line["val_dice"] for line in self.metrics if "val_dice" in line]
        return max(scores) if scores else None

    @property
    def test_dice(self) -> float | None:
        return (self.summary or {}).get("test_dice_mean")

    def cases_worst_first(self) -> list[dict]:
        return sorted(self.per_case, key=lambda row: (float(row.get("dice", "nan")), row["case_id"]))


def _fetch(uri: str, what: str, problems: list, missing: str = "missing") -> bytes | None:
    """An artifact's bytes, or ``None`` with the reason added to ``problems``."""
    try:
        data = s3io.read_uri(uri)
    except s3io.S3Error as err:
        problems.append(f"{what}: unreadable ({err})")
        return None
    if data is None:
        problems.append(f"{what}: {missing}")
    return data


def _read_json(uri: str, what: str, problems: list):
    data = _fetch(uri, what, problems)
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError as err:
        problems.append(f"{what}: not valid JSON ({err})")
        return None


def read_metrics(uri: str, problems: list) -> list[dict]:
    """The epoch lines of ``metrics.jsonl`` read so far; a torn last line (a job still writing) is noted."""
    try:
        lines = s3io.read_lines(uri)
    except s3io.S3Error as err:
        problems.append(f"metrics/metrics.jsonl: unreadable ({err})")
        return []
    if lines is None:
        problems.append("metrics/metrics.jsonl: missing (no epoch finished yet?)")
        return []
    metrics = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            metrics.append(json.loads(line))
        except ValueError:
            problems.append(f"metrics/metrics.jsonl: line {number} is incomplete or malformed; skipped")
    return metrics


def read_per_case(uri: str, problems: list) -> list[dict]:
    data = _fetch(uri, "metrics/test_per_case.csv", problems, "missing (no test evaluation yet)")
    return list(csv.DictReader(io.StringIO(data.decode()))) if data is not None else []


def load_run(uri: str) -> Run:
    """Every artifact of the run at ``uri`` (``s3://…/<run>/``) that can be read."""
    uri = uri.rstrip("/") + "/"
    run = Run(name=uri.rstrip("/").rsplit("/", 1)[-1], uri=uri)
    status = _read_json(uri + "run.json", "run.json", run.problems) or {}
    run.status = status.get("status", "unknown")
    run.started = status.get("started")
    run.error = status.get("error", "")
    run.hyperparameters = status.get("hyperparameters", {})
    run.metrics = read_metrics(uri + "metrics/metrics.jsonl", run.problems)
    if run.status in ("finished", "unknown"):
        run.summary = _read_json(uri + "summary.json", "summary.json", run.problems)
        run.per_case = read_per_case(uri + "metrics/test_per_case.csv", run.problems)
    if run.summary and not run.hyperparameters:
        run.hyperparameters = run.summary.get("hyperparameters", {})
    return run


def is_run(uri: str) -> bool:
    return s3io.read_uri(uri.rstrip("/") + "/run.json") is not None


def list_runs(output_uri: str) -> list[Run]:
    """The runs directly under ``output_uri`` (folders with a ``run.json``), oldest first."""
    bucket, prefix = s3io.parse_uri(output_uri.rstrip("/") + "/")
    folders, _ = s3io.list_folders(bucket, prefix)
    runs = [load_run(f"s3://{bucket}/{folder}") for folder in folders
            if s3io.read_uri(f"s3://{bucket}/{folder}run.json") is not None]
    return sorted(runs, key=lambda run: (run.started or 0, run.name))


def differing_hyperparameters(runs: list[Run]) -> list[str]:
    """Hyperparameters whose values are not the same in every run (data and output URIs aside)."""
    names = sorted({name for run in runs for name in run.hyperparameters} - {"output_uri", "run_name"})
    return [name for name in names if len({json.dumps(run.hyperparameters.get(name)) for run in runs}) > 1]


def load_crop(run: Run, case_id: str) -> dict | None:
    """The prediction crop of one test case, or ``None`` (noted in ``run.problems``)."""
    data = _fetch(run.uri + f"predictions/{case_id}.npz", f"predictions/{case_id}.npz", run.problems)
    if data is None:
        return None
    with np.load(io.BytesIO(data)) as arrays:
        return {name: arrays[name] for name in arrays.files}
