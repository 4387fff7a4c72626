"""Reading what training runs wrote to S3 (or a local copy), tolerant of runs still going or cut short.

A run is a folder ``<output-uri>/<run>/`` holding ``run.json`` (see ``brainseg.layout``). Every
artifact is read on its own; one that is missing or malformed becomes a line in ``ReviewedRun.problems``,
never an exception, so a half-written or failed run can still be reviewed.

``metrics.jsonl`` is read incrementally: :class:`MetricsTail` remembers how far it got and each
refresh fetches only the bytes after the last complete line (a ranged GET), so a running job can be
followed while the file grows; a file rewritten in between (a job resumed from an older
checkpoint) is noticed and read again from the start.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from brainseg.io import s3
from brainseg.layout import RunLayout
from infra.review import source

CROP_ARRAYS = ("image", "mask", "prediction")


class MetricsTail:
    """The epoch lines of one ``metrics.jsonl``, extended by each :meth:`poll`.

    A poll asks for the object from the end of the last complete line, starting ``OVERLAP`` bytes
    earlier: if those bytes are not what was read before, the file was rewritten and is read again
    from the start. A torn last line (a writer that appends in place) is left for the next poll.
    """

    OVERLAP = 256

    def __init__(self, uri: str):
        self.uri = uri
        self.modified: float | None = None
        self.rewrites = 0
        self._reset()

    def _reset(self) -> None:
        self.lines: list[dict] = []
        self.offset = 0  # end of the last complete line read
        self.line_count = 0
        self.malformed: list[int] = []
        self.torn = False
        self.missing = False
        self._seen = b""  # the last bytes before ``offset``, to recognise the same file next time

    def poll(self) -> list[dict]:
        """The epoch lines completed since the last poll.

        Raises:
            s3.S3Error: the object could not be read.
        """
        tail = source.read_from(self.uri, self.offset - len(self._seen))
        if tail is None:
            self._reset()
            self.missing = True
            return []
        self.modified = tail.modified
        if tail.size < self.offset or not tail.data.startswith(self._seen):
            self._reset()
            self.rewrites += 1
            return self.poll()
        self.missing = False
        new = tail.data[len(self._seen):]
        end = new.rfind(b"\n") + 1
        added = []
        for raw in new[:end].split(b"\n")[:-1]:
            self.line_count += 1
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                line = None
            if isinstance(line, dict) and isinstance(line.get("epoch"), int):
                added.append(line)
            else:
                self.malformed.append(self.line_count)
        self.offset += end
        self._seen = (self._seen + new[:end])[-self.OVERLAP:]
        self.torn = bool(new[end:].strip())
        self.lines += added
        return added

    @property
    def problems(self) -> list[str]:
        what = RunLayout.METRICS
        notes = [f"{what}: line {number} is not an epoch record; skipped" for number in self.malformed]
        if self.missing:
            notes.append(f"{what}: missing (no epoch finished yet?)")
        if self.torn:
            notes.append(f"{what}: line {self.line_count + 1} is incomplete (still being written?); skipped")
        return notes


def dice_rank(text) -> float:
    """A Dice cell as a sort key, a NaN (nothing scored) below every real value."""
    dice = float(text)
    return -1.0 if math.isnan(dice) else dice


def is_number(text) -> bool:
    """Whether a CSV cell reads as a number (NaN included)."""
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def _utc(timestamp: float | None) -> str:
    if timestamp is None:
        return "?"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 0):.0f} s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.0f} d ago"


@dataclass
class ReviewedRun:
    """One run's artifacts as far as they could be read; :meth:`refresh` reads them again."""

    name: str
    uri: str
    found: bool = False  # run.json exists
    status: str = "unknown"
    started: float | None = None
    updated: float | None = None  # newest write seen to run.json or metrics.jsonl
    error: str = ""
    hyperparameters: dict = field(default_factory=dict)
    summary: dict | None = None
    per_case: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    tail: MetricsTail | None = None
    lr_find: dict | None = None  # a learning-rate range test's lr_find.json (task lr_find)
    job_status: str | None = None  # the SageMaker training job's own status, when it could be asked
    job_reason: str = ""

    @property
    def running(self) -> bool:
        """Still writing: run.json says running and SageMaker, if asked, does not say the job ended."""
        return self.status == "running" and self.job_status in (None, "InProgress")

    @property
    def status_text(self) -> str:
        """The run's status, or the job's when SageMaker says it ended while run.json still says running
        (killed, out of memory, stopped before it could write)."""
        if self.status == "running" and self.job_status not in (None, "InProgress"):
            return f"job {self.job_status}"
        return self.status

    @property
    def metrics(self) -> list[dict]:
        return self.tail.lines if self.tail else []

    @property
    def problems(self) -> list[str]:
        job = [f"SageMaker job {self.job_status}: {self.job_reason}"] if self.job_reason else []
        return job + self.notes + (self.tail.problems if self.tail else [])

    @property
    def started_text(self) -> str:
        return _utc(self.started)

    @property
    def updated_text(self) -> str:
        return _utc(self.updated)

    def updated_ago(self, now: float | None = None) -> str:
        return "?" if self.updated is None else _age((now or time.time()) - self.updated)

    @property
    def best_val_dice(self) -> float | None:
        if self.summary and self.summary.get("best_val_dice") is not None:
            return self.summary["best_val_dice"]
        scores = [line["val_dice"] for line in self.metrics if isinstance(line.get("val_dice"), (int, float))]
        return max(scores) if scores else None

    @property
    def test_dice(self) -> float | None:
        return (self.summary or {}).get("test_dice_mean")

    @property
    def structures(self) -> list[str]:
        """The scored structures when there are several (their per-case columns exist)."""
        names = (self.summary or {}).get("structures") or []
        return list(names) if len(names) > 1 else []

    def cases_worst_first(self) -> list[dict]:
        """Test cases by Dice, lowest first (a NaN Dice counts as worst)."""
        return sorted(self.per_case, key=lambda row: (dice_rank(row["dice"]), row["case_id"]))

    def _fetch(self, relative: str, missing: str = "missing") -> s3.Tail | None:
        try:
            tail = source.read_from(self.uri + relative)
        except s3.S3Error as err:
            self.notes.append(f"{relative}: unreadable ({err})")
            return None
        if tail is None:
            self.notes.append(f"{relative}: {missing}")
        return tail

    def _read_json(self, relative: str) -> tuple[dict | None, float | None]:
        tail = self._fetch(relative)
        if tail is None:
            return None, None
        try:
            value = json.loads(tail.data)
        except ValueError as err:
            self.notes.append(f"{relative}: not valid JSON ({err})")
            return {}, tail.modified
        if not isinstance(value, dict):
            self.notes.append(f"{relative}: expected a JSON object, found {type(value).__name__}")
            return {}, tail.modified
        return value, tail.modified

    def _read_per_case(self) -> list[dict]:
        relative = RunLayout.TEST_CASES
        tail = self._fetch(relative, "missing (no test evaluation yet)")
        if tail is None:
            return []
        rows = []
        for number, row in enumerate(csv.DictReader(io.StringIO(tail.data.decode(errors="replace"))), start=2):
            if not row.get("case_id") or not is_number(row.get("dice")):
                self.notes.append(f"{relative}: line {number} has no case_id or no numeric dice; skipped")
                continue
            rows.append(row)
        return rows

    def refresh(self) -> list[dict]:
        """Read ``run.json`` again, the metrics lines written since the last refresh and, unless the
        run is still going or failed, its summary and per-case results. Returns the new epoch lines."""
        self.notes = []
        status, status_modified = self._read_json(RunLayout.STATUS)
        self.found = status is not None
        if status is None:
            return []
        self.status = str(status.get("status", "unknown"))
        self.started = status.get("started") if isinstance(status.get("started"), (int, float)) else None
        self.error = str(status.get("error", ""))
        hyperparameters = status.get("hyperparameters")
        self.hyperparameters = hyperparameters if isinstance(hyperparameters, dict) else {}
        if hyperparameters is not None and not isinstance(hyperparameters, dict):
            self.notes.append(f"{RunLayout.STATUS}: hyperparameters should be a JSON object, found {type(hyperparameters).__name__}")
        added = []
        if self.hyperparameters.get("task") != "lr_find":  # a range test writes no epochs
            if self.tail is None:
                self.tail = MetricsTail(self.uri + RunLayout.METRICS)
            try:
                added = self.tail.poll()
            except s3.S3Error as err:
                self.notes.append(f"{RunLayout.METRICS}: unreadable ({err})")
        written = (status_modified, self.tail.modified if self.tail else None)
        self.updated = max((t for t in written if t is not None), default=None)
        if self.status in ("finished", "unknown"):
            self.summary, _ = self._read_json(RunLayout.SUMMARY)
            if (self.summary or {}).get("task") == "lr_find":
                self.lr_find, _ = self._read_json(RunLayout.LR_FIND)
            else:
                self.per_case = self._read_per_case()
        if self.summary and not self.hyperparameters and isinstance(self.summary.get("hyperparameters"), dict):
            self.hyperparameters = self.summary["hyperparameters"]
        return added

    def load_crop(self, case_id: str) -> dict | None:
        """The prediction crop of one test case, or ``None`` (the reason noted in ``problems``)."""
        relative = RunLayout.prediction(case_id)
        tail = self._fetch(relative)
        if tail is None:
            return None
        try:
            with np.load(io.BytesIO(tail.data)) as arrays:
                crop = {name: arrays[name] for name in arrays.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            self.notes.append(f"{relative}: not a readable .npz ({type(err).__name__}: {err})")
            return None
        shapes = {name: crop[name].shape[-3:] for name in CROP_ARRAYS if name in crop}
        dimensions = {name: crop[name].ndim for name in CROP_ARRAYS if name in crop}
        if (len(shapes) < len(CROP_ARRAYS) or len(set(shapes.values())) != 1 or dimensions["mask"] != 3
                or dimensions["prediction"] != 3 or dimensions["image"] not in (3, 4)):
            self.notes.append(f"{relative}: expected an image (C, D, H, W) or (D, H, W) with a mask and a "
                              f"prediction (D, H, W) of the same size, found "
                              f"{ {name: crop[name].shape for name in CROP_ARRAYS if name in crop} }")
            return None
        return crop


def load_run(uri: str) -> ReviewedRun:
    """Every artifact of the run at ``uri`` (``s3://…/<run>/`` or a local folder) that can be read; ``found`` is
    false when there is no ``run.json`` there."""
    uri = uri.rstrip("/") + "/"
    run = ReviewedRun(name=uri.rstrip("/").rsplit("/", 1)[-1], uri=uri)
    run.refresh()
    return run


def list_runs(output_uri: str, name_prefix: str = "") -> list[ReviewedRun]:
    """The runs directly under ``output_uri`` (folders with a ``run.json``) whose names start with
    ``name_prefix``, oldest first, read concurrently."""
    folders = source.list_folders(output_uri.rstrip("/") + "/" + name_prefix)
    runs = s3.executor().map(load_run, folders)
    return sorted((run for run in runs if run.found), key=lambda run: (run.started or 0, run.name))


def ask_sagemaker(runs: list[ReviewedRun], session=None) -> None:
    """Each run's SageMaker job status (runs are named after their jobs), when this machine has AWS
    credentials and a region; runs that are no SageMaker job (process or local mode) keep none, and
    a denied or unreachable SageMaker leaves every run as it was."""
    import boto3
    import botocore.exceptions

    from infra.launcher.lifecycle import JobNotFound, assigned, get_job
    session = session or boto3.Session()
    if not runs or session.region_name is None or session.get_credentials() is None:
        return
    for run in runs:
        try:
            job = get_job(run.name, session)
        except JobNotFound:
            continue
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
            return
        run.job_status = job.training_job_status
        run.job_reason = (assigned(job.failure_reason) or "") if run.job_status == "Failed" else ""


def differing_hyperparameters(runs: list[ReviewedRun]) -> list[str]:
    """Hyperparameters whose values are not the same in every run (data and output URIs aside)."""
    names = sorted({name for run in runs for name in run.hyperparameters} - {"output_uri", "run_name"})
    return [name for name in names if len({json.dumps(run.hyperparameters.get(name)) for run in runs}) > 1]
