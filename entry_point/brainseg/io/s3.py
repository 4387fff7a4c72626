"""S3 operations: ranged reads that check their body length and retry short or failed reads,
line streams that resume where they broke off, listings, and writes (single PUTs, conditional
PUTs, multipart uploads through s3transfer and smart-open).

With :mod:`brainseg.io.s3_client` (the client, pools, counters, errors and the retry loop), the
only code that talks to S3; the names callers need from there are re-exported here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import botocore.exceptions

from brainseg.io.s3_client import (
    _BOTO_ERRORS,
    _MISSING_CODES,
    _PRECONDITION_CODES,
    _RANGE_CODES,
    _TRANSIENT,
    READ_ATTEMPTS,
    Conflict,
    S3Error,
    _count,
    _ensure_process_state,
    _error_code,
    _process,
    _ShortBody,
    _wrap,
    client,
    executor,
    parse_uri,
    reset_client,
    reset_stats,
    retrying,
    stats,
)
from brainseg.io.s3_writes import copy_object, create_bucket, delete, open_write, put_bytes, upload_file, write_lines

__all__ = ["READ_ATTEMPTS", "Conflict", "ObjectInfo", "S3Error", "Tail", "check_bucket", "client", "copy_object", "create_bucket",
           "delete", "executor", "get_object", "get_range", "get_ranges", "list_folders", "list_objects", "list_tree", "head", "Head",
           "open_write", "parse_uri", "put_bytes", "read_from", "read_lines", "read_uri", "reset_client",
           "reset_stats", "retrying", "stats", "upload_file", "write_lines"]

logger = logging.getLogger(__name__)

STREAM_CHUNK_BYTES = 1024 * 1024  # 1 MiB reads when streaming an object line by line
MAX_LINE_BYTES = 64 * 1024 * 1024  # 64 MiB: a longer "line" means the object is not line-oriented


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One listed object: its key, size in bytes and ETag (quotes stripped)."""

    key: str
    size: int
    etag: str


def _object_info(item: dict) -> ObjectInfo:
    return ObjectInfo(item["Key"], int(item["Size"]), item["ETag"].strip('"'))


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


def _read(bucket: str, key: str, start: int = 0, stop: int | None = None, etag: str | None = None,
          to_end: bool = False) -> Tail | None:
    """Bytes ``[start, stop)`` (to the end when ``stop`` is None, or when ``to_end`` and the object
    ends first) in one GET, retried on transient failures and on bodies shorter than the range S3
    says it sent; ``None`` when the object does not exist."""
    span = f"bytes {start}-{'' if stop is None else stop - 1}"

    def attempt() -> Tail | None:
        response = _open(bucket, key, start, stop, etag)
        if response is None:
            return None
        data = response["Body"].read() if response["Body"] is not None else b""
        _count(bytes_received=len(data))
        size = _total_size(response, start, len(data))
        if stop is not None and size < stop and not (to_end and start < size):
            raise S3Error(f"s3://{bucket}/{key} is {size} bytes; cannot read bytes {start}-{stop - 1}")
        expected = max(0, (size if stop is None else min(stop, size)) - start)
        if len(data) != expected:
            raise _ShortBody(f"short body: got {len(data)} of {expected} bytes")
        return Tail(data, size, response["LastModified"].timestamp(), response["ETag"].strip('"'))

    return retrying(attempt, lambda attempts, err: f"GET {span} of s3://{bucket}/{key} failed after {attempts} "
                                                    f"attempts: {type(err).__name__}: {err}")


def get_range(bucket: str, key: str, start: int, stop: int, etag: str | None = None, to_end: bool = False) -> bytes:
    """Bytes ``[start, stop)`` of an object, retried until the body has the expected length.

    Args:
        etag: when given, S3 serves the range only if the object still has this ETag
            (``If-Match``), so bytes located by an older index are never mixed with new content.
        to_end: an object that ends before ``stop`` (but after ``start``) gives its bytes up to
            its end instead of an error (whole blocks for a cache).

    Raises:
        S3Error: the request failed after retries, the object is missing, changed since
            ``etag`` was recorded, or shorter than ``stop`` (without ``to_end``).
    """
    if not 0 <= start < stop:
        raise ValueError(f"byte range [{start}, {stop}) of s3://{bucket}/{key} is empty or negative")
    tail = _read(bucket, key, start, stop, etag, to_end)
    if tail is None:
        raise S3Error(f"GET bytes {start}-{stop - 1} of s3://{bucket}/{key} failed: NoSuchKey (the object is "
                      "gone; it was listed or indexed earlier)")
    return tail.data


def get_ranges(requests: Sequence[tuple], to_end: bool = False) -> list[bytes]:
    """Fetch many ``(bucket, key, start, stop[, etag])`` ranges concurrently, in request order
    (``to_end`` as in :func:`get_range`)."""
    if len(requests) == 1:
        return [get_range(*_padded(requests[0]), to_end=to_end)]
    _ensure_process_state()
    futures = [_process["leaf_pool"].submit(get_range, *_padded(request), to_end=to_end) for request in requests]
    return [future.result() for future in futures]


def _padded(request: tuple) -> tuple:
    return request if len(request) == 5 else (*request, None)


def get_object(bucket: str, key: str) -> bytes:
    """A whole object (retried like every read).

    Raises:
        S3Error: it does not exist, or the read failed after retries.
    """
    tail = _read(bucket, key)
    if tail is None:
        raise S3Error(f"GET s3://{bucket}/{key} failed: NoSuchKey")
    return tail.data


@dataclass(frozen=True, slots=True)
class Head:
    """What a HEAD request says of an object: its size in bytes, ETag (quotes stripped) and user metadata."""

    size: int
    etag: str
    metadata: dict


def head(uri: str) -> Head | None:
    """An object's size, ETag and user metadata, or ``None`` when it does not exist.

    Raises:
        S3Error: the HEAD failed for another reason.
    """
    bucket, key = parse_uri(uri)
    try:
        response = client().head_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as err:
        if _error_code(err) in _MISSING_CODES:
            return None
        raise _wrap(err, "HEAD", bucket, key) from err
    except botocore.exceptions.BotoCoreError as err:
        raise _wrap(err, "HEAD", bucket, key) from err
    return Head(int(response["ContentLength"]), response["ETag"].strip('"'), dict(response.get("Metadata", {})))


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


def read_lines(uri: str) -> Iterator[bytes] | None:
    """The lines of an object, streamed (never whole in memory), or ``None`` when it does not exist.

    A stream that breaks (reset, timeout, cut body) continues with a ranged GET from the last byte
    received, pinned to the object's ETag so a rewritten object is never spliced onto the old one;
    each chunk is fetched through :func:`retrying`, like every other read.

    Raises (while iterating):
        S3Error: a chunk failed ``READ_ATTEMPTS`` times, or the object was rewritten or removed.
        ValueError: a line is longer than ``MAX_LINE_BYTES`` (the object is not line-oriented).
    """
    bucket, key = parse_uri(uri)
    first = retrying(lambda: _open(bucket, key, 0, None, None),
                     lambda attempts, err: f"GET s3://{bucket}/{key} failed after {attempts} attempts: "
                                           f"{type(err).__name__}: {err}", retry_on=_TRANSIENT)
    if first is None:
        return None
    stream = _ResumingBody(bucket, key, first)

    def lines() -> Iterator[bytes]:
        pending = b""
        while stream.position < stream.size:
            chunk = retrying(stream.next_chunk, stream.failure)
            *complete, pending = (pending + chunk).split(b"\n")
            if len(pending) > MAX_LINE_BYTES:
                raise ValueError(f"s3://{bucket}/{key} has a line longer than {MAX_LINE_BYTES} bytes "
                                 "(not a line-oriented file)")
            yield from complete
        if pending:
            yield pending

    return lines()


class _ResumingBody:
    """The chunks of one object's body; after a break, the next chunk comes from a new ranged GET
    that starts at the first byte not yet received and requires the first response's ETag."""

    def __init__(self, bucket: str, key: str, first: dict):
        self.bucket, self.key = bucket, key
        self.etag = first["ETag"].strip('"')
        self.size = _total_size(first, 0, first.get("ContentLength", 0))
        self.position = 0
        self._chunks = self._body(first)

    @staticmethod
    def _body(response: dict) -> Iterator[bytes]:
        return response["Body"].iter_chunks(STREAM_CHUNK_BYTES) if response["Body"] else iter(())

    def next_chunk(self) -> bytes:
        """The next chunk (never empty before the end). Raises a transient error or ``_ShortBody``
        after a break, so that the caller retries and this resumes."""
        if self._chunks is None:
            response = _open(self.bucket, self.key, self.position, None, self.etag, streaming=True)
            if response is None:
                raise S3Error(f"s3://{self.bucket}/{self.key} disappeared while it was being read")
            self._chunks = self._body(response)
        try:
            chunk = next(self._chunks, b"")
        except _TRANSIENT:
            self._chunks = None
            raise
        if not chunk:
            self._chunks = None
            raise _ShortBody(f"stream ended at byte {self.position} of {self.size}")
        self.position += len(chunk)
        _count(bytes_received=len(chunk))
        return chunk

    def failure(self, attempts: int, err: Exception) -> str:
        return (f"GET s3://{self.bucket}/{self.key} broke off at byte {self.position} {attempts} times: "
                f"{type(err).__name__}: {err}")


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
