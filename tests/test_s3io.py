"""S3 I/O against real HTTP: counters, retries of short bodies, errors naming bucket and key, fork safety."""

import multiprocessing
import os

import pytest

from brainseg import s3io
from infra.s3server import EmbeddedS3


def test_counters_follow_requests_and_bytes(bucket):
    s3io.put_bytes(f"s3://{bucket}/blob", bytes(range(256)) * 40)
    s3io.reset_stats()
    assert s3io.get_range(bucket, "blob", 100, 300) == (bytes(range(256)) * 40)[100:300]
    parts = s3io.get_ranges([(bucket, "blob", 0, 10), (bucket, "blob", 5000, 5100), (bucket, "blob", 20, 21)])
    assert [len(p) for p in parts] == [10, 100, 1]
    stats = s3io.stats()
    assert stats["get_requests"] == 4 and stats["bytes_received"] == 200 + 111
    s3io.reset_stats()
    assert s3io.stats()["get_requests"] == 0


def test_short_bodies_are_retried():
    saved = os.environ["AWS_ENDPOINT_URL"]
    with EmbeddedS3(truncate_every=2) as faulty:
        os.environ["AWS_ENDPOINT_URL"] = faulty.endpoint_url
        s3io.reset_client()
        try:
            s3io.client().create_bucket(Bucket="faulty")
            data = os.urandom(50_000)
            s3io.put_bytes("s3://faulty/blob", data)
            s3io.reset_stats()
            for start in range(0, 50_000, 5_000):
                assert s3io.get_range("faulty", "blob", start, start + 5_000) == data[start:start + 5_000]
            stats = s3io.stats()
            assert stats["range_retries"] >= 5
            assert stats["get_requests"] == 10 + stats["range_retries"]
        finally:
            os.environ["AWS_ENDPOINT_URL"] = saved
            s3io.reset_client()


def test_reading_past_the_end_names_the_object(bucket):
    s3io.put_bytes(f"s3://{bucket}/small", b"x" * 10)
    with pytest.raises(s3io.S3Error, match=rf"s3://{bucket}/small"):
        s3io.get_range(bucket, "small", 5, 50)


def test_missing_key_names_bucket_and_key(bucket):
    with pytest.raises(s3io.S3Error, match=rf"s3://{bucket}/absent.dcm failed: NoSuchKey"):
        s3io.get_range(bucket, "absent.dcm", 0, 10)
    assert s3io.read_uri(f"s3://{bucket}/absent.dcm") is None


def test_read_from_an_offset_tells_nothing_new_from_rewritten_shorter(bucket):
    uri = f"s3://{bucket}/growing.jsonl"
    assert s3io.read_from(uri) is None
    s3io.put_bytes(uri, b"0123456789")
    whole = s3io.read_from(uri)
    assert (whole.data, whole.size) == (b"0123456789", 10) and whole.modified > 0
    s3io.reset_stats()
    tail = s3io.read_from(uri, 6)
    assert (tail.data, tail.size) == (b"6789", 10) and s3io.stats()["bytes_received"] == 4
    at_end = s3io.read_from(uri, 10)
    assert (at_end.data, at_end.size) == (b"", 10)
    s3io.put_bytes(uri, b"abc")
    shorter = s3io.read_from(uri, 6)
    assert (shorter.data, shorter.size) == (b"", 3)
    s3io.put_bytes(uri, b"")
    assert s3io.read_from(uri).data == b""
    with pytest.raises(ValueError, match="negative offset -1"):
        s3io.read_from(uri, -1)


def _read_in_child(bucket, queue):
    data = s3io.get_range(bucket, "blob", 0, 3)
    queue.put((data, s3io.stats()["get_requests"]))


def test_forked_process_builds_its_own_client(bucket):
    s3io.put_bytes(f"s3://{bucket}/blob", b"abc")
    s3io.get_range(bucket, "blob", 0, 3)  # the parent's client and pool exist before the fork
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(bucket, queue))
    child.start()
    data, child_requests = queue.get(timeout=30)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert data == b"abc"
    assert child_requests == 1  # fresh per-process state: only the child's own request is counted


@pytest.mark.parametrize("uri", ["bucket/key", "http://bucket/key", "s3://", ""])
def test_parse_uri_rejects(uri):
    with pytest.raises(ValueError, match="s3://bucket"):
        s3io.parse_uri(uri)
