"""S3 I/O: the only module that talks to S3.

One boto3 client and one bounded thread pool per process (re-created after ``fork``, so
DataLoader workers never share a connection pool), ranged GETs that check their body length
and retry short or failed reads, and counters of what was requested and received.
smart-open is used for streaming (multipart) writes of artifacts.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import boto3
import botocore.config
import botocore.exceptions
import smart_open

logger = logging.getLogger(__name__)

MAX_CONCURRENCY = int(os.environ.get("BRAINSEG_S3_CONCURRENCY", "32"))  # ranged GETs in flight per process
BOTO_MAX_ATTEMPTS = 8  # botocore "adaptive" retries of throttling and 5xx
RANGE_ATTEMPTS = 4  # our own retries of a short or broken range body
RETRY_BACKOFF_S = 0.05
STREAM_CHUNK_BYTES = 1024 * 1024  # 1 MiB reads when streaming an object line by line

_lock = threading.Lock()
_process: dict = {"pid": None, "client": None, "pool": None}
_counters = {"get_requests": 0, "bytes_received": 0, "range_retries": 0, "put_requests": 0,
             "bytes_sent": 0, "list_requests": 0}


class S3Error(RuntimeError):
    """An S3 request failed; the message names the bucket and key."""


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
    """The process's bounded pool for concurrent ranged GETs."""
    _ensure_process_state()
    return _process["pool"]


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
        _process["pool"] = ThreadPoolExecutor(MAX_CONCURRENCY, thread_name_prefix="s3-range")
        _process["pid"] = pid
        # A forked child inherits the parent's counters; it reports its own work only.
        for name in _counters:
            _counters[name] = 0


def reset_client() -> None:
    """Drop this process's client and pool; the next call builds them from the current environment
    (for example after ``AWS_ENDPOINT_URL`` changed)."""
    with _lock:
        if _process["pool"] is not None and _process["pid"] == os.getpid():
            _process["pool"].shutdown(wait=True)
        _process.update(pid=None, client=None, pool=None)


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
                       "AWS_ENDPOINT_URL for a local S3 such as infra/s3server.py)")
    if isinstance(err, botocore.exceptions.ClientError):
        return S3Error(f"{action} s3://{bucket}/{key} failed: {_error_code(err) or '?'} ({err})")
    return S3Error(f"{action} s3://{bucket}/{key} failed: {type(err).__name__}: {err}")


_TRANSIENT = (
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionError,
    botocore.exceptions.IncompleteReadError,
)


def get_range(bucket: str, key: str, start: int, stop: int, etag: str | None = None) -> bytes:
    """Bytes ``[start, stop)`` of an object, retried until the body has the expected length.

    Args:
        etag: when given, S3 serves the range only if the object still has this ETag
            (``If-Match``), so bytes located by an older index are never mixed with new content.

    Raises:
        S3Error: the request failed after retries, the object changed since ``etag`` was
            recorded, or it is shorter than ``stop``.
    """
    if not 0 <= start < stop:
        raise ValueError(f"byte range [{start}, {stop}) of s3://{bucket}/{key} is empty or negative")
    expected = stop - start
    last_error: Exception | None = None
    for attempt in range(RANGE_ATTEMPTS):
        try:
            conditions = {"IfMatch": etag} if etag else {}
            response = client().get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{stop - 1}", **conditions)
            body = response["Body"].read()
        except botocore.exceptions.ClientError as err:
            _count(get_requests=1)
            if _error_code(err) in ("PreconditionFailed", "412"):
                raise S3Error(f"s3://{bucket}/{key} changed since it was indexed (ETag {etag} no longer "
                              "matches); rebuild the index: python infra/inspect_data.py DATA_URI "
                              "--refresh-index") from err
            raise _wrap(err, f"GET bytes {start}-{stop - 1} of", bucket, key) from err
        except _TRANSIENT as err:
            _count(get_requests=1, range_retries=1)
            last_error = err
        except botocore.exceptions.BotoCoreError as err:
            raise _wrap(err, f"GET bytes {start}-{stop - 1} of", bucket, key) from err
        else:
            _count(get_requests=1, bytes_received=len(body))
            if len(body) == expected:
                return body
            last_error = S3Error(f"short body: got {len(body)} of {expected} bytes")
            _count(range_retries=1)
            if "ContentRange" in response and response["ContentRange"].rsplit("/", 1)[-1].isdigit():
                size = int(response["ContentRange"].rsplit("/", 1)[-1])
                if size < stop:
                    raise S3Error(f"s3://{bucket}/{key} is {size} bytes; cannot read bytes {start}-{stop - 1}")
        time.sleep(RETRY_BACKOFF_S * 2**attempt)
    raise S3Error(f"GET bytes {start}-{stop - 1} of s3://{bucket}/{key} failed after "
                  f"{RANGE_ATTEMPTS} attempts: {last_error}") from last_error


def get_ranges(requests: Sequence[tuple]) -> list[bytes]:
    """Fetch many ``(bucket, key, start, stop[, etag])`` ranges concurrently, in request order."""
    if len(requests) == 1:
        return [get_range(*requests[0])]
    futures = [executor().submit(get_range, *request) for request in requests]
    return [future.result() for future in futures]


def get_object(bucket: str, key: str) -> bytes:
    """A whole object in one GET."""
    try:
        body = client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except _BOTO_ERRORS as err:
        _count(get_requests=1)
        raise _wrap(err, "GET", bucket, key) from err
    _count(get_requests=1, bytes_received=len(body))
    return body


def read_uri(uri: str) -> bytes | None:
    """A whole object named by URI, or ``None`` when it does not exist."""
    tail = read_from(uri)
    return None if tail is None else tail.data


@dataclass(frozen=True, slots=True)
class Tail:
    """Bytes from an offset to the end of an object, with the object's size and last-modified time."""

    data: bytes
    size: int
    modified: float


def read_from(uri: str, start: int = 0) -> Tail | None:
    """An object's bytes from ``start`` to its end in one GET (a ranged GET when ``start`` > 0),
    or ``None`` when it does not exist. An object no longer than ``start`` gives empty ``data``
    and its current size, so a reader tailing a growing file can tell "nothing new" from "rewritten
    shorter"."""
    if start < 0:
        raise ValueError(f"cannot read {uri} from negative offset {start}")
    bucket, key = parse_uri(uri)
    ranged = {"Range": f"bytes={start}-"} if start else {}
    action = f"GET from byte {start} of" if start else "GET"
    try:
        response = client().get_object(Bucket=bucket, Key=key, **ranged)
        data = response["Body"].read()
    except botocore.exceptions.ClientError as err:
        _count(get_requests=1)
        code = _error_code(err)
        if code in _MISSING_CODES:
            return None
        if code not in ("InvalidRange", "416"):
            raise _wrap(err, action, bucket, key) from err
        try:
            head = client().head_object(Bucket=bucket, Key=key)
        except _BOTO_ERRORS as head_err:
            if _error_code(head_err) in _MISSING_CODES:
                return None
            raise _wrap(head_err, "HEAD", bucket, key) from head_err
        return Tail(b"", int(head["ContentLength"]), head["LastModified"].timestamp())
    except botocore.exceptions.BotoCoreError as err:
        raise _wrap(err, action, bucket, key) from err
    _count(get_requests=1, bytes_received=len(data))
    content_range = response.get("ContentRange", "")
    size = int(content_range.rsplit("/", 1)[-1]) if content_range[-1:].isdigit() else start + len(data)
    return Tail(data, size, response["LastModified"].timestamp())


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


def put_bytes(uri: str, data: bytes, content_type: str = "application/octet-stream") -> None:
    """Write one small object in a single PUT."""
    bucket, key = parse_uri(uri)
    try:
        client().put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
    except _BOTO_ERRORS as err:
        raise _wrap(err, "PUT", bucket, key) from err
    _count(put_requests=1, bytes_sent=len(data))


def open_write(uri: str, mode: str = "wb"):
    """A streaming writer (multipart upload) for a large artifact at ``uri``."""
    parse_uri(uri)
    return smart_open.open(uri, mode, transport_params={"client": client()})


def read_lines(uri: str) -> Iterator[bytes] | None:
    """The lines of an object, streamed (never whole in memory), or ``None`` when it does not exist."""
    bucket, key = parse_uri(uri)
    try:
        response = client().get_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as err:
        _count(get_requests=1)
        if _error_code(err) in _MISSING_CODES:
            return None
        raise _wrap(err, "GET", bucket, key) from err
    except botocore.exceptions.BotoCoreError as err:
        raise _wrap(err, "GET", bucket, key) from err
    _count(get_requests=1)

    def lines() -> Iterator[bytes]:
        try:
            for line in response["Body"].iter_lines(chunk_size=STREAM_CHUNK_BYTES):
                _count(bytes_received=len(line) + 1)
                yield line
        except _TRANSIENT as err:
            raise _wrap(err, "GET", bucket, key) from err

    return lines()


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
    """Fail early, with the bucket named, when the bucket of ``uri`` is missing or not reachable.

    Raises:
        S3Error: HEAD bucket failed (missing bucket, access denied, no endpoint, no credentials).
    """
    bucket, _ = parse_uri(uri)
    try:
        client().head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as err:
        code = _error_code(err)
        hint = {"404": "it does not exist; create it or fix the URI",
                "NoSuchBucket": "it does not exist; create it or fix the URI",
                "403": "access denied; grant the job's role s3:ListBucket on it"}.get(code, str(err))
        raise S3Error(f"bucket {bucket!r} of {uri} is not usable: {hint}") from err
    except botocore.exceptions.BotoCoreError as err:
        raise _wrap(err, "HEAD", bucket, "") from err
