"""S3 writes: single PUTs (conditional ones for locks and pointers), multipart uploads of files
(s3transfer) and of streamed artifacts (smart-open), bucket creation and deletes. Re-exported by
:mod:`brainseg.io.s3`, which callers import.
"""

from __future__ import annotations

from collections.abc import Iterable

import boto3
import botocore.exceptions
import smart_open

from brainseg.io.s3_client import (
    _BOTO_ERRORS,
    _PRECONDITION_CODES,
    Conflict,
    _count,
    _error_code,
    _wrap,
    client,
    parse_uri,
)


def put_bytes(uri: str, data: bytes, content_type: str = "application/octet-stream", *,
              if_none_match: bool = False, if_match: str | None = None, metadata: dict | None = None) -> str:
    """Write one small object in a single PUT; returns its new ETag.

    Args:
        if_none_match: write only if no object exists at ``uri`` (S3 conditional write).
        if_match: write only if the object still has this ETag.
        metadata: the object's user metadata (``x-amz-meta-*``), text keys and values.

    Raises:
        Conflict: a condition did not hold (someone else wrote or created the object).
        S3Error: the PUT failed after botocore's retries.
    """
    bucket, key = parse_uri(uri)
    conditions = {"IfNoneMatch": "*"} if if_none_match else {}
    if if_match:
        conditions["IfMatch"] = if_match
    if metadata:
        conditions["Metadata"] = metadata
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


def copy_object(source_uri: str, uri: str, metadata: dict) -> None:
    """Copy an object within S3 (no bytes pass through this host), giving the copy ``metadata``.
    One CopyObject request: objects up to 5 GB.

    Raises:
        S3Error: the copy failed (the message names the destination).
    """
    source_bucket, source_key = parse_uri(source_uri)
    bucket, key = parse_uri(uri)
    try:
        client().copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": source_bucket, "Key": source_key},
                             Metadata=metadata, MetadataDirective="REPLACE")
    except _BOTO_ERRORS as err:
        raise _wrap(err, "COPY", bucket, key) from err
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
