"""One writer per run: a job owns ``<run>/owner.json`` before it writes anything else there.

The claim is created with a conditional PUT (``If-None-Match: *``), so of two jobs started with the
same run name and output only one gets it. The owner rewrites the claim every ``HEARTBEAT_S``
seconds (``If-Match`` its last ETag, so a claim taken over by another job is noticed) and marks it
released when it stops, however it stops short of SIGKILL. A second job finding a claim:

* released, or left by a process of this machine that no longer exists (a run killed with
  SIGKILL and started again): takes it over at once;
* otherwise watches it: if the claim changes, its owner is alive and the second job stops with a
  clear error; if it stays unchanged for ``STALE_AFTER_S`` (the owner's instance is gone), the
  second job takes it over. A claim's age is S3's LastModified against this machine's clock; how
  long it stays unchanged is measured with this process's monotonic clock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from brainseg.config import Hyperparameters
from brainseg.environment import Environment
from brainseg.io import s3
from brainseg.layout import RunLayout
from brainseg.locations import check_run_name, inside
from brainseg.run import distributed
from brainseg.run.errors import TrainingError

logger = logging.getLogger(__name__)

HEARTBEAT_S = float(os.environ.get("BRAINSEG_HEARTBEAT_S", "30"))  # the owner rewrites its claim this often
STALE_AFTER_S = 4 * HEARTBEAT_S  # an unchanged claim this old is a dead job's
LAST_MODIFIED_RESOLUTION_S = 1.0


class RunTaken(RuntimeError):
    """Another live job owns the run (or took it over); the message says which and what to do."""


def _machine() -> str:
    """This machine's boot and PID namespace: equal only for processes whose PIDs can be checked here."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Claim:
    """The parsed ``owner.json`` with its ETag and S3 age."""

    record: dict
    etag: str
    age_s: float

    @property
    def released(self) -> bool:
        return bool(self.record.get("released"))

    def describe(self) -> str:
        job = self.record.get("job") or "a job"
        return (f"{job} (host {self.record.get('host', '?')}, pid {self.record.get('pid', '?')}, last heartbeat "
                f"{self.age_s:.0f} s ago)")

    def abandoned_here(self) -> bool:
        """Written by a process of this machine that no longer exists."""
        pid = self.record.get("pid")
        return (bool(_machine()) and self.record.get("machine") == _machine() and isinstance(pid, int)
                and pid != os.getpid() and not _process_exists(pid))


class RunLock:
    """Claim, keep and release a run folder. ``acquire()`` before writing; ``release()`` at the end."""

    def __init__(self, output_uri: str, run_name: str, job: str | None = None):
        self.uri = f"{output_uri.rstrip('/')}/{run_name}/{RunLayout.OWNER}"
        self.run_name = run_name
        self.token = uuid.uuid4().hex
        self.job = job or ""
        self.etag: str | None = None
        self.lost = ""  # why ownership was lost, if it was
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self, **extra) -> bytes:
        return json.dumps({"token": self.token, "job": self.job, "host": socket.gethostname(), "pid": os.getpid(),
                           "machine": _machine(), "heartbeat": time.time(), **extra}, indent=1).encode()

    def _read(self) -> Claim | None:
        tail = s3.read_from(self.uri)
        if tail is None:
            return None
        try:
            record = json.loads(tail.data)
        except ValueError:
            record = None
        # LastModified has one-second resolution: count the claim younger, never older, than it may be.
        age = max(0.0, time.time() - tail.modified - LAST_MODIFIED_RESOLUTION_S)
        return Claim(record if isinstance(record, dict) else {}, tail.etag, age)

    def acquire(self) -> None:
        """Own the run, waiting to see whether an existing claim is alive (see the module docstring).

        Raises:
            RunTaken: another job is alive and owns it.
            s3.S3Error: S3 failed after retries.
        """
        watched: tuple[str, float] | None = None  # (etag, monotonic time it was first seen)
        while True:
            try:
                self.etag = s3.put_bytes(self.uri, self._record(), "application/json", if_none_match=True)
                break
            except s3.Conflict:
                claim = self._read()
            if claim is None:
                continue  # released and removed in between: try to create it again
            if claim.record.get("token") == self.token:  # our own PUT, answered 412 on botocore's retry
                self.etag = claim.etag
                break
            if watched is not None and watched[0] != claim.etag and not claim.released:
                raise RunTaken(f"run {self.run_name} is being written by another job: {claim.describe()}; wait for "
                               "it to finish or stop it, or pass another --run-name")
            first_look = watched is None or watched[0] != claim.etag
            if first_look:
                watched = (claim.etag, time.monotonic() - claim.age_s)
            unchanged_s = time.monotonic() - watched[1]
            if claim.released or claim.abandoned_here() or unchanged_s >= STALE_AFTER_S:
                why = ("it was released" if claim.released else "its process no longer exists"
                       if claim.abandoned_here() else f"its claim has not changed for {unchanged_s:.0f} s")
                if self._take_over(claim.etag):
                    logger.info("run %s: taking it over from %s: %s", self.run_name, claim.describe(), why)
                    break
                watched = None
                continue
            if first_look:
                logger.info("run %s is claimed by %s; watching whether it is alive (at most %.0f s)",
                            self.run_name, claim.describe(), STALE_AFTER_S - unchanged_s)
            time.sleep(min(HEARTBEAT_S / 3, max(0.1, STALE_AFTER_S - unchanged_s)))
        self._thread = threading.Thread(target=self._heartbeat, name="run-heartbeat", daemon=True)
        self._thread.start()

    def _replace(self, etag: str, **extra) -> Claim | None:
        """Rewrite the claim if it still has ``etag``; ``None`` when it was written, else the claim
        someone else wrote. A PUT retried by botocore after a lost answer meets its own first
        write (412): the token tells it apart from another job's."""
        try:
            self.etag = s3.put_bytes(self.uri, self._record(**extra), "application/json", if_match=etag)
            return None
        except s3.Conflict:
            claim = self._read()
        if claim is not None and claim.record.get("token") == self.token:
            self.etag = claim.etag
            return None
        return claim or Claim({}, "", 0.0)

    def _take_over(self, etag: str) -> bool:
        return self._replace(etag) is None

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                other = self._replace(self.etag)
            except s3.S3Error as err:
                logger.warning("run %s: heartbeat not written (%s); trying again in %.0f s", self.run_name, err,
                               HEARTBEAT_S)
                continue
            if other is not None:
                self.lost = f"another job took over run {self.run_name}: {other.describe()}"
                logger.error("%s; this job stops writing to it", self.lost)
                return

    def check(self) -> None:
        """Raise :class:`RunTaken` if another job has taken the run over (call before writing)."""
        if self.lost:
            raise RunTaken(self.lost)

    def release(self, status: str) -> None:
        """Stop the heartbeat and mark the claim released (nothing happens if it was never held)."""
        if self.etag is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost:
            return
        try:
            if self._replace(self.etag, released=True, status=status) is not None:
                logger.warning("run %s: another job took it over before it was released", self.run_name)
        except s3.S3Error as err:
            logger.warning("run %s: could not release its claim (%s); the next job takes it over once it is "
                           "stale (%.0f s)", self.run_name, err, STALE_AFTER_S)
        self.etag = None


def resolve_run_name(hp: Hyperparameters, env: Environment) -> str:
    """``hp.run_name``, else the SageMaker job name, else a UTC timestamp (rank 0's, on every rank)."""
    name = hp.run_name or env.job_name or time.strftime("run-%Y%m%d-%H%M%S", time.gmtime())
    try:
        check_run_name(name, "run_name" if hp.run_name else "TRAINING_JOB_NAME")
        if inside(hp.data_uri, hp.run_uri(name)):
            raise ValueError(f"data_uri {hp.data_uri} is inside the run folder {hp.run_uri(name)}; pick another "
                             "run name or output_uri")
    except ValueError as err:
        raise TrainingError(str(err)) from None
    return distributed.broadcast(name)
