"""The S3 connection: one boto3 client and two bounded thread pools per process (re-created after
``fork``, so DataLoader workers never share a connection pool), the request counters, the error
types and their messages, and the one retry loop every read goes through.

:mod:`brainseg.io.s3` builds the operations (ranged reads, listings, writes) on these.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import boto3
import botocore.config
import botocore.exceptions

T = TypeVar("T")

MAX_CONCURRENCY = int(os.environ.get("BRAINSEG_S3_CONCURRENCY", "32"))  # ranged GETs in flight per process
BOTO_MAX_ATTEMPTS = 8  # botocore "adaptive" retries of throttling and 5xx
READ_ATTEMPTS = 6  # our own attempts at a read whose body broke off or came back short
RETRY_BACKOFF_S = 0.1  # doubled after each failed attempt, with jitter

_lock = threading.Lock()
_process: dict = {"pid": None, "client": None, "leaf_pool": None, "fan_out_pool": None}
_counters = {"get_requests": 0, "bytes_received": 0, "retries": 0, "put_requests": 0,
             "bytes_sent": 0, "list_requests": 0}
_counted_in = {"pid": os.getpid()}  # the process _counters belong to


class S3Error(RuntimeError):
    """An S3 request failed; the message names the bucket and key."""


class Conflict(S3Error):
    """A conditional write found the object created or changed by someone else."""


def parse_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``.

    Raises:
        ValueError: when ``uri`` is not an ``s3://`` URI with a bucket.
    """
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ValueError(f"expected an S3 URI like s3://bucket/prefix/, got {uri!r}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"S3 URI {uri!r} has no bucket name; expected s3://bucket/prefix/")
    return bucket, key


def client():
    """The process's boto3 S3 client (endpoint from ``AWS_ENDPOINT_URL`` when set)."""
    _ensure_process_state()
    return _process["client"]


def executor() -> ThreadPoolExecutor:
    """The process's pool for fanning work out over objects or cases (each task may read ranges).

    Leaf GETs (:func:`get_ranges`) run on a pool of their own, so a task here that waits on its
    ranges never holds a thread those ranges need.
    """
    _ensure_process_state()
    return _process["fan_out_pool"]


def _ensure_process_state() -> None:
    pid = os.getpid()
    if _process["pid"] == pid:
        return
    with _lock:
        if _process["pid"] == pid:
            return
        config = botocore.config.Config(
            retries={"mode": "adaptive", "max_attempts": BOTO_MAX_ATTEMPTS},
            max_pool_connections=MAX_CONCURRENCY + 4,
            connect_timeout=10,
            read_timeout=60,
        )
        session = boto3.session.Session()
        _process["client"] = session.client("s3", config=config)
        _process["leaf_pool"] = ThreadPoolExecutor(MAX_CONCURRENCY, thread_name_prefix="s3-range")
        _process["fan_out_pool"] = ThreadPoolExecutor(MAX_CONCURRENCY, thread_name_prefix="s3-task")
        _process["pid"] = pid


def reset_client() -> None:
    """Drop this process's client and pools; the next call builds them from the current environment
    (for example after ``AWS_ENDPOINT_URL`` changed)."""
    with _lock:
        if _process["pid"] == os.getpid():
            for pool in (_process["fan_out_pool"], _process["leaf_pool"]):
                pool.shutdown(wait=True)
        _process.update(pid=None, client=None, leaf_pool=None, fan_out_pool=None)


def _own_counters() -> dict:
    """This process's counters (hold ``_lock``): a forked child starts from zero, whether it reads
    them or counts first, so it reports its own work only."""
    if _counted_in["pid"] != os.getpid():
        _counted_in["pid"] = os.getpid()
        for name in _counters:
            _counters[name] = 0
    return _counters


def _count(**increments: int) -> None:
    with _lock:
        counters = _own_counters()
        for name, value in increments.items():
            counters[name] += value


def stats() -> dict:
    """Counters for this process: GET requests, bytes received, range retries, PUTs, LISTs."""
    with _lock:
        return dict(_own_counters())


def reset_stats() -> None:
    """Zero this process's counters."""
    with _lock:
        for name in _counters:
            _counters[name] = 0


_BOTO_ERRORS = (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError)
_MISSING_CODES = ("NoSuchKey", "404")


def _error_code(err: Exception) -> str:
    """S3's error code of a ClientError ("NoSuchKey", "PreconditionFailed", ...), else ""."""
    if isinstance(err, botocore.exceptions.ClientError):
        return err.response.get("Error", {}).get("Code", "")
    return ""


def _wrap(err: Exception, action: str, bucket: str, key: str) -> S3Error:
    if isinstance(err, (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError)):
        return S3Error(f"{action} s3://{bucket}/{key} failed: no AWS credentials found; configure a "
                       "profile or role, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and "
                       "AWS_ENDPOINT_URL for a local S3 such as brainseg-s3server)")
    if isinstance(err, botocore.exceptions.ClientError):
        return S3Error(f"{action} s3://{bucket}/{key} failed: {_error_code(err) or '?'} ({err})")
    return S3Error(f"{action} s3://{bucket}/{key} failed: {type(err).__name__}: {err}")


# Failures of a request or of reading its body that a new request may not meet again: dropped or
# reset connections, timeouts, bodies cut short (with or without a checksum that then fails).
_TRANSIENT = (
    botocore.exceptions.HTTPClientError,  # ResponseStreamingError, ReadTimeoutError, ConnectionClosedError
    botocore.exceptions.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.FlexibleChecksumError,
)
_PRECONDITION_CODES = ("PreconditionFailed", "412")
_RANGE_CODES = ("InvalidRange", "416")
_jitter = random.Random()  # never the global generator: training checkpoints its state


class _ShortBody(Exception):
    """A response body ended before the bytes its Content-Range announced."""


def _backoff(attempt: int, base_s: float | None = None) -> None:
    base_s = RETRY_BACKOFF_S if base_s is None else base_s
    time.sleep(base_s * 2**attempt * _jitter.uniform(0.5, 1.0))


def retrying(operation: Callable[[], T], failure: Callable[[int, Exception], str], *, attempts: int = 0,
             retry_on: tuple = (), backoff_s: float | None = None, note: Callable[[int, Exception], None] | None = None
             ) -> T:
    """The one retry loop of this package: ``operation()`` until it returns, again after each
    exception in ``retry_on`` (default: transient network failures and short bodies), counted in
    :func:`stats` and after a jittered exponential backoff (``backoff_s`` doubling, default
    :data:`RETRY_BACKOFF_S`). ``note(attempt, error)`` hears of each failure that is retried.

    Raises:
        S3Error: ``failure(attempts, last error)`` once ``attempts`` (default :data:`READ_ATTEMPTS`) failed.
    """
    attempts, retry_on = attempts or READ_ATTEMPTS, retry_on or (*_TRANSIENT, _ShortBody)
    for attempt in range(attempts):
        try:
            return operation()
        except retry_on as err:
            _count(retries=1)
            if attempt + 1 == attempts:
                raise S3Error(failure(attempts, err)) from err
            if note is not None:
                note(attempt + 1, err)
            _backoff(attempt, backoff_s)
    raise AssertionError("unreachable: the loop returns or raises")
