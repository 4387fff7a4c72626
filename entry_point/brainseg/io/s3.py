"""S3 I/O: the only module that talks to S3.

One boto3 client and one bounded thread pool per process (re-created after ``fork``, so
DataLoader workers never share a connection pool), ranged GETs that check their body length
and retry short or failed reads, and counters of what was requested and received.
smart-open is used for streaming (multipart) writes of artifacts.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import boto3
import botocore.config
import botocore.exceptions
import smart_open

logger = logging.getLogger(__name__)
T = TypeVar("T")

MAX_CONCURRENCY = int(os.environ.get("BRAINSEG_S3_CONCURRENCY", "32"))  # ranged GETs in flight per process
BOTO_MAX_ATTEMPTS = 8  # botocore "adaptive" retries of throttling and 5xx
READ_ATTEMPTS = 6  # our own attempts at a read whose body broke off or came back short
RETRY_BACKOFF_S = 0.1  # doubled after each failed attempt, with jitter
STREAM_CHUNK_BYTES = 1024 * 1024  # 1 MiB reads when streaming an object line by line
MAX_LINE_BYTES = 64 * 1024 * 1024  # 64 MiB: a longer "line" means the object is not line-oriented

_lock = threading.Lock()
_process: dict = {"pid": None, "client": None, "leaf_pool": None, "fan_out_pool": None}
_counters = {"get_requests": 0, "bytes_received": 0, "retries": 0, "put_requests": 0,
             "bytes_sent": 0, "list_requests": 0}


class S3Error(RuntimeError):
    """An S3 request failed; the message names the bucket and key."""


class Conflict(S3Error):
    """A conditional write found the object created or changed by someone else."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One listed object: its key, size in bytes and ETag (quotes stripped)."""

    key: str
    size: int
    etag: str


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
        # A forked child inherits the parent's counters; it reports its own work only.
        for name in _counters:
            _counters[name] = 0


def reset_client() -> None:
    """Drop this process's client and pools; the next call builds them from the current environment
    (for example after ``AWS_ENDPOINT_URL`` changed)."""
    with _lock:
        if _process["pid"] == os.getpid():
            for pool in (_process["fan_out_pool"], _process["leaf_pool"]):
                pool.shutdown(wait=True)
        _process.update(pid=None, client=None, leaf_pool=None, fan_out_pool=None)


def _count(**increments: int) -> None:
    with _lock:
        for name, value in increments.items():
            _counters[name] += value


def stats() -> dict:
    """Counters for this process: GET requests, bytes received, range retries, PUTs, LISTs."""
    with _lock:
        return dict(_counters)


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


def _object_info(item: dict) -> ObjectInfo:
    return ObjectInfo(item["Key"], int(item["Size"]), item["ETag"].strip('"'))


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


def _total_size(response: dict, start: int, received: int) -> int:
    content_range = response.get("ContentRange", "")
    return int(content_range.rsplit("/", 1)[-1]) if content_range[-1:].isdigit() else start + received


def _changed(bucket: str, key: str, etag: str, streaming: bool) -> S3Error:
    if streaming:
        return S3Error(f"s3://{bucket}/{key} was rewritten while it was being read (ETag {etag} no longer "
                       "matches); read it again")
    return S3Error(f"s3://{bucket}/{key} changed since it was indexed (ETag {etag} no longer matches); rebuild "
                   "the index: brainseg-inspect DATA_URI --refresh-index")


def _open(bucket: str, key: str, start: int, stop: int | None, etag: str | None,
          streaming: bool = False) -> dict | None:
    """One ranged GetObject: bytes ``[start, stop)``, or from ``start`` to the end when ``stop`` is
    None (``bytes=0-`` for a whole object, so the answer says the object's size and a short body is
    noticed). ``None`` when the object does not exist; an object no longer than ``start`` gives a
    response whose ``Body`` is ``None``. Transient errors propagate to the caller's retry loop."""
    conditions = {"IfMatch": etag} if etag else {}
    span = f"bytes={start}-{'' if stop is None else stop - 1}"
    s3 = client()  # first: it resets the counters in a freshly forked process
    _count(get_requests=1)
    try:
        return s3.get_object(Bucket=bucket, Key=key, Range=span, **conditions)
    except botocore.exceptions.ClientError as err:
        code = _error_code(err)
        if code in _MISSING_CODES:
            return None
        if code in _PRECONDITION_CODES and etag:
            raise _changed(bucket, key, etag, streaming) from err
        if code in _RANGE_CODES and stop is None:
            try:
                head = s3.head_object(Bucket=bucket, Key=key, **conditions)
            except _BOTO_ERRORS as head_err:
                if _error_code(head_err) in _MISSING_CODES:
                    return None
                raise _wrap(head_err, "HEAD", bucket, key) from head_err
            return {"Body": None, "ContentLength": 0, "ContentRange": f"bytes */{head['ContentLength']}",
                    "LastModified": head["LastModified"], "ETag": head["ETag"]}
        raise _wrap(err, f"GET {span} of", bucket, key) from err
    except _TRANSIENT:
        raise
    except botocore.exceptions.BotoCoreError as err:
        raise _wrap(err, f"GET {span} of", bucket, key) from err


def _read(bucket: str, key: str, start: int = 0, stop: int | None = None, etag: str | None = None) -> Tail | None:
    """Bytes ``[start, stop)`` (to the end when ``stop`` is None) in one GET, retried on transient
    failures and on bodies shorter than the range S3 says it sent; ``None`` when the object does
    not exist."""
    span = f"bytes {start}-{'' if stop is None else stop - 1}"

    def attempt() -> Tail | None:
        response = _open(bucket, key, start, stop, etag)
        if response is None:
            return None
        data = response["Body"].read() if response["Body"] is not None else b""
        _count(bytes_received=len(data))
        size = _total_size(response, start, len(data))
        if stop is not None and size < stop:
            raise S3Error(f"s3://{bucket}/{key} is {size} bytes; cannot read bytes {start}-{stop - 1}")
        expected = max(0, (size if stop is None else stop) - start)
        if len(data) != expected:
            raise _ShortBody(f"short body: got {len(data)} of {expected} bytes")
        return Tail(data, size, response["LastModified"].timestamp(), response["ETag"].strip('"'))

    return retrying(attempt, lambda attempts, err: f"GET {span} of s3://{bucket}/{key} failed after {attempts} "
                                                    f"attempts: {type(err).__name__}: {err}")


def get_range(bucket: str, key: str, start: int, stop: int, etag: str | None = None) -> bytes:
    """Bytes ``[start, stop)`` of an object, retried until the body has the expected length.

    Args:
        etag: when given, S3 serves the range only if the object still has this ETag
            (``If-Match``), so bytes located by an older index are never mixed with new content.

    Raises:
        S3Error: the request failed after retries, the object is missing, changed since
            ``etag`` was recorded, or shorter than ``stop``.
    """
    if not 0 <= start < stop:
        raise ValueError(f"byte range [{start}, {stop}) of s3://{bucket}/{key} is empty or negative")
    tail = _read(bucket, key, start, stop, etag)
    if tail is None:
        raise S3Error(f"GET bytes {start}-{stop - 1} of s3://{bucket}/{key} failed: NoSuchKey (the object is "
                      "gone; it was listed or indexed earlier)")
    return tail.data


def get_ranges(requests: Sequence[tuple]) -> list[bytes]:
    """Fetch many ``(bucket, key, start, stop[, etag])`` ranges concurrently, in request order."""
    if len(requests) == 1:
        return [get_range(*requests[0])]
    _ensure_process_state()
    futures = [_process["leaf_pool"].submit(get_range, *request) for request in requests]
    return [future.result() for future in futures]


def get_object(bucket: str, key: str) -> bytes:
    """A whole object (retried like every read).

    Raises:
        S3Error: it does not exist, or the read failed after retries.
    """
    tail = _read(bucket, key)
    if tail is None:
        raise S3Error(f"GET s3://{bucket}/{key} failed: NoSuchKey")
    return tail.data


def read_uri(uri: str) -> bytes | None:
    """A whole object named by URI, or ``None`` when it does not exist."""
    tail = read_from(uri)
    return None if tail is None else tail.data


@dataclass(frozen=True, slots=True)
class Tail:
    """Bytes from an offset to the end of an object, with the object's size, last-modified time and ETag."""

    data: bytes
    size: int
    modified: float
    etag: str = ""


def read_from(uri: str, start: int = 0) -> Tail | None:
    """An object's bytes from ``start`` to its end (retried like every read), or ``None`` when it
    does not exist. An object no longer than ``start`` gives empty ``data`` and its current size,
    so a reader tailing a growing file can tell "nothing new" from "rewritten shorter"."""
    if start < 0:
        raise ValueError(f"cannot read {uri} from negative offset {start}")
    bucket, key = parse_uri(uri)
    return _read(bucket, key, start)


def list_objects(bucket: str, prefix: str) -> Iterator[ObjectInfo]:
    """Every object under ``prefix``, paginated."""
    paginator = client().get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            _count(list_requests=1)
            for item in page.get("Contents", []):
                yield _object_info(item)
    except _BOTO_ERRORS as err:
        raise _wrap(err, "LIST", bucket, prefix) from err


def list_folders(bucket: str, prefix: str) -> tuple[list[str], list[ObjectInfo]]:
    """The sub-prefixes directly under ``prefix`` (ending in "/") and the objects at its top level."""
    folders, objects = [], []
    paginator = client().get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            _count(list_requests=1)
            folders += [item["Prefix"] for item in page.get("CommonPrefixes", [])]
            objects += [_object_info(item) for item in page.get("Contents", [])]
    except _BOTO_ERRORS as err:
        raise _wrap(err, "LIST", bucket, prefix) from err
    return folders, objects


def list_tree(bucket: str, prefix: str) -> list[ObjectInfo]:
    """Every object under ``prefix``, listing its folders concurrently (one LIST per folder page)
    instead of paging through the whole tree one request after another."""
    folders, objects = list_folders(bucket, prefix)
    for listed in executor().map(lambda folder: list(list_objects(bucket, folder)), folders):
        objects += listed
    return objects


def put_bytes(uri: str, data: bytes, content_type: str = "application/octet-stream", *,
              if_none_match: bool = False, if_match: str | None = None) -> str:
    """Write one small object in a single PUT; returns its new ETag.

    Args:
        if_none_match: write only if no object exists at ``uri`` (S3 conditional write).
        if_match: write only if the object still has this ETag.

    Raises:
        Conflict: a condition did not hold (someone else wrote or created the object).
        S3Error: the PUT failed after botocore's retries.
    """
    bucket, key = parse_uri(uri)
    conditions = {"IfNoneMatch": "*"} if if_none_match else {}
    if if_match:
        conditions["IfMatch"] = if_match
    try:
        response = client().put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type, **conditions)
    except botocore.exceptions.ClientError as err:
        if conditions and _error_code(err) in (*_PRECONDITION_CODES, "ConditionalRequestConflict", "409"):
            raise Conflict(f"PUT s3://{bucket}/{key}: {'the object exists' if if_none_match else 'the object changed'} "
                           f"({_error_code(err)})") from err
        raise _wrap(err, "PUT", bucket, key) from err
    except botocore.exceptions.BotoCoreError as err:
        raise _wrap(err, "PUT", bucket, key) from err
    _count(put_requests=1, bytes_sent=len(data))
    return response["ETag"].strip('"')


def upload_file(path, uri: str) -> None:
    """Upload a local file with s3transfer: one PUT for a small file, a parallel multipart upload
    (8 MiB parts) for a large one, retried by botocore.

    Raises:
        S3Error: the upload failed.
    """
    bucket, key = parse_uri(uri)
    try:
        client().upload_file(str(path), bucket, key)
    except (*_BOTO_ERRORS, boto3.exceptions.S3UploadFailedError) as err:
        raise _wrap(err, "PUT", bucket, key) from err
    _count(put_requests=1)


def create_bucket(bucket: str) -> None:
    """Create ``bucket`` (in the client's region) unless it exists already.

    Raises:
        S3Error: the bucket could not be created.
    """
    region = client().meta.region_name
    settings = {} if region in (None, "us-east-1") else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    try:
        client().create_bucket(Bucket=bucket, **settings)
    except botocore.exceptions.ClientError as err:
        if _error_code(err) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise _wrap(err, "CREATE BUCKET", bucket, "") from err
    except botocore.exceptions.BotoCoreError as err:
        raise _wrap(err, "CREATE BUCKET", bucket, "") from err


def open_write(uri: str, mode: str = "wb"):
    """A streaming writer (multipart upload) for a large artifact at ``uri``."""
    parse_uri(uri)
    return smart_open.open(uri, mode, transport_params={"client": client()})


def read_lines(uri: str) -> Iterator[bytes] | None:
    """The lines of an object, streamed (never whole in memory), or ``None`` when it does not exist.

    A stream that breaks (reset, timeout, cut body) continues with a ranged GET from the last byte
    received, pinned to the object's ETag so a rewritten object is never spliced onto the old one.

    Raises (while iterating):
        S3Error: the stream broke off ``READ_ATTEMPTS`` times, or the object was rewritten.
        ValueError: a line is longer than ``MAX_LINE_BYTES`` (the object is not line-oriented).
    """
    bucket, key = parse_uri(uri)
    first = _open_retried(bucket, key, 0, None)
    if first is None:
        return None
    etag = first["ETag"].strip('"')
    size = _total_size(first, 0, first.get("ContentLength", 0))

    def lines() -> Iterator[bytes]:
        response, position, pending, failures = first, 0, b"", 0
        while True:
            try:
                for chunk in (response["Body"].iter_chunks(STREAM_CHUNK_BYTES) if response["Body"] else ()):
                    position += len(chunk)
                    _count(bytes_received=len(chunk))
                    *complete, pending = (pending + chunk).split(b"\n")
                    if len(pending) > MAX_LINE_BYTES:
                        raise ValueError(f"s3://{bucket}/{key} has a line longer than {MAX_LINE_BYTES} bytes "
                                         "(not a line-oriented file)")
                    yield from complete
                if position >= size:
                    break
                error: Exception = _ShortBody(f"stream ended at byte {position} of {size}")
            except _TRANSIENT as err:
                error = err
            failures += 1
            _count(retries=1)
            if failures >= READ_ATTEMPTS:
                raise S3Error(f"GET s3://{bucket}/{key} broke off at byte {position} {failures} times: "
                              f"{type(error).__name__}: {error}") from error
            _backoff(failures - 1)
            response = _open_retried(bucket, key, position, etag)
            if response is None:
                raise S3Error(f"s3://{bucket}/{key} disappeared while it was being read")
        if pending:
            yield pending

    return lines()


def _open_retried(bucket: str, key: str, start: int, etag: str | None) -> dict | None:
    """:func:`_open` from ``start`` to the end, retrying transient failures of the request itself."""
    return retrying(lambda: _open(bucket, key, start, None, etag, streaming=True),
                    lambda attempts, err: f"GET s3://{bucket}/{key} from byte {start} failed after {attempts} "
                                          f"attempts: {type(err).__name__}: {err}", retry_on=_TRANSIENT)


def write_lines(uri: str, lines: Iterable[str]) -> None:
    """Stream text lines to ``uri`` as one object (multipart when large).

    Raises:
        S3Error: the upload failed; the message names the bucket and key.
    """
    bucket, key = parse_uri(uri)
    try:
        with open_write(uri, "w") as stream:
            for line in lines:
                stream.write(line)
                stream.write("\n")
    except (OSError, ValueError, *_BOTO_ERRORS) as err:
        raise _wrap(err, "write", bucket, key) from err


def delete(uri: str) -> None:
    """Delete one object (deleting a missing object is not an error in S3)."""
    bucket, key = parse_uri(uri)
    try:
        client().delete_object(Bucket=bucket, Key=key)
    except _BOTO_ERRORS as err:
        raise _wrap(err, "DELETE", bucket, key) from err


def check_bucket(uri: str) -> None:
    """Fail early, with the bucket named, when the bucket of ``uri`` is missing or its prefix cannot
    be listed. One LIST of at most one key under the prefix: unlike HeadBucket it is allowed by a
    policy that grants ``s3:ListBucket`` only on that prefix.

    Raises:
        S3Error: missing bucket, access denied, no endpoint, no credentials.
    """
    bucket, prefix = parse_uri(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""  # a folder: what a prefix-scoped grant names
    try:
        client().list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except botocore.exceptions.ClientError as err:
        code = _error_code(err)
        hint = {"NoSuchBucket": "it does not exist; create it or fix the URI",
                "AccessDenied": f"access denied; grant the job's role s3:ListBucket on it for the prefix {prefix!r}"
                }.get(code, str(err))
        raise S3Error(f"bucket {bucket!r} of {uri} is not usable: {hint}") from err
    except botocore.exceptions.BotoCoreError as err:
        raise _wrap(err, "LIST", bucket, prefix) from err
    finally:
        _count(list_requests=1)
