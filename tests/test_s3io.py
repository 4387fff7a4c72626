"""S3 I/O against real HTTP: counters, every read retried through injected faults, conditional writes,
errors naming bucket and key, fork safety."""

import multiprocessing
import os
import threading

import botocore.exceptions
import pytest

from brainseg.io import s3, s3_client


def test_counters_follow_requests_and_bytes(bucket):
    s3.put_bytes(f"s3://{bucket}/blob", bytes(range(256)) * 40)
    s3.reset_stats()
    assert s3.get_range(bucket, "blob", 100, 300) == (bytes(range(256)) * 40)[100:300]
    parts = s3.get_ranges([(bucket, "blob", 0, 10), (bucket, "blob", 5000, 5100), (bucket, "blob", 20, 21)])
    assert [len(p) for p in parts] == [10, 100, 1]
    stats = s3.stats()
    assert stats["get_requests"] == 4 and stats["bytes_received"] == 200 + 111
    s3.reset_stats()
    assert s3.stats()["get_requests"] == 0


FAULTS = ["slowdown", "error500", "reset", "cut", "short", "short-checksum"]
READS = {
    "get_range": lambda uri, data: s3.get_range(*s3.parse_uri(uri), 1000, 41000) == data[1000:41000],
    "read_uri": lambda uri, data: s3.read_uri(uri) == data,
    "read_from": lambda uri, data: s3.read_from(uri, 7).data == data[7:],
    "read_lines": lambda uri, data: b"\n".join(s3.read_lines(uri)) == data,
}


@pytest.mark.parametrize("read", sorted(READS))
@pytest.mark.parametrize("fault", FAULTS)
def test_every_read_survives_every_transient_fault(bucket, faults, fault, read):
    data = b"\n".join(b"%06d " % n + os.urandom(40).hex().encode() for n in range(2000))
    uri = f"s3://{bucket}/blob"
    s3.put_bytes(uri, data)
    faults.set({"fault": fault, "method": "GET", "key": "/blob$", "times": 2})
    s3.reset_stats()
    assert READS[read](uri, data)
    assert faults.injected() == 2
    if fault not in ("slowdown", "error500", "reset"):  # those botocore retries itself
        assert s3.stats()["retries"] == 2


def test_a_stream_that_breaks_resumes_where_it_stopped(bucket, faults, monkeypatch):
    monkeypatch.setattr(s3, "STREAM_CHUNK_BYTES", 64 * 1024)
    lines = [b"%07d" % n * 20 for n in range(40_000)]  # 5.6 MB
    uri = f"s3://{bucket}/index.jsonl"
    s3.put_bytes(uri, b"\n".join(lines) + b"\n")
    faults.set({"fault": "cut", "method": "GET", "key": "index.jsonl", "times": 3})
    s3.reset_stats()
    assert list(s3.read_lines(uri)) == lines
    stats = s3.stats()
    assert stats["retries"] == 3 and stats["get_requests"] == 4
    assert stats["bytes_received"] < 2 * 5.6e6  # each resumption starts where the last one broke off


def test_a_stream_never_splices_a_rewritten_object(bucket, faults):
    uri = f"s3://{bucket}/index.jsonl"
    s3.put_bytes(uri, b"\n".join(b"%07d" % n * 20 for n in range(200_000)))
    faults.set({"fault": "cut", "method": "GET", "key": "index.jsonl", "times": 1})
    stream = s3.read_lines(uri)
    next(stream)
    s3.put_bytes(uri, b"new content\n")
    with pytest.raises(s3.S3Error, match="rewritten while it was being read"):
        list(stream)


def test_a_fault_that_never_clears_fails_with_the_object_named(bucket, faults, monkeypatch):
    monkeypatch.setattr(s3_client, "RETRY_BACKOFF_S", 0.0)
    s3.put_bytes(f"s3://{bucket}/blob", b"x" * 1000)
    faults.set({"fault": "short", "method": "GET", "key": "/blob$"})
    with pytest.raises(s3.S3Error, match=rf"s3://{bucket}/blob failed after 6 attempts: _ShortBody"):
        s3.get_range(bucket, "blob", 0, 1000)
    with pytest.raises(s3.S3Error, match=rf"s3://{bucket}/blob failed after 6 attempts"):
        s3.read_uri(f"s3://{bucket}/blob")


def test_an_object_with_no_newline_is_not_read_whole_as_a_line(bucket, monkeypatch):
    monkeypatch.setattr(s3, "MAX_LINE_BYTES", 1000)
    s3.put_bytes(f"s3://{bucket}/image.dcm", b"D" * 5000)
    with pytest.raises(ValueError, match="has a line longer than 1000 bytes"):
        next(s3.read_lines(f"s3://{bucket}/image.dcm"))


def test_conditional_writes(bucket):
    uri = f"s3://{bucket}/owner.json"
    first = s3.put_bytes(uri, b"mine", if_none_match=True)
    with pytest.raises(s3.Conflict, match="the object exists"):
        s3.put_bytes(uri, b"theirs", if_none_match=True)
    second = s3.put_bytes(uri, b"mine again", if_match=first)
    with pytest.raises(s3.Conflict, match="the object changed"):
        s3.put_bytes(uri, b"stale", if_match=first)
    assert s3.read_from(uri).etag == second and s3.read_uri(uri) == b"mine again"


def test_reading_past_the_end_names_the_object(bucket):
    s3.put_bytes(f"s3://{bucket}/small", b"x" * 10)
    with pytest.raises(s3.S3Error, match=rf"s3://{bucket}/small"):
        s3.get_range(bucket, "small", 5, 50)


def test_missing_key_names_bucket_and_key(bucket):
    with pytest.raises(s3.S3Error, match=rf"s3://{bucket}/absent.dcm failed: NoSuchKey"):
        s3.get_range(bucket, "absent.dcm", 0, 10)
    assert s3.read_uri(f"s3://{bucket}/absent.dcm") is None


def test_read_from_an_offset_tells_nothing_new_from_rewritten_shorter(bucket):
    uri = f"s3://{bucket}/growing.jsonl"
    assert s3.read_from(uri) is None
    s3.put_bytes(uri, b"0123456789")
    whole = s3.read_from(uri)
    assert (whole.data, whole.size) == (b"0123456789", 10) and whole.modified > 0
    s3.reset_stats()
    tail = s3.read_from(uri, 6)
    assert (tail.data, tail.size) == (b"6789", 10) and s3.stats()["bytes_received"] == 4
    at_end = s3.read_from(uri, 10)
    assert (at_end.data, at_end.size) == (b"", 10)
    s3.put_bytes(uri, b"abc")
    shorter = s3.read_from(uri, 6)
    assert (shorter.data, shorter.size) == (b"", 3)
    s3.put_bytes(uri, b"")
    assert s3.read_from(uri).data == b""
    with pytest.raises(ValueError, match="negative offset -1"):
        s3.read_from(uri, -1)


def _read_in_child(bucket, queue):
    before = s3.stats()["get_requests"]  # read before this process makes any request (a worker's baseline)
    data = s3.get_range(bucket, "blob", 0, 3)
    queue.put((data, before, s3.stats()["get_requests"]))


def test_forked_process_builds_its_own_client(bucket):
    s3.put_bytes(f"s3://{bucket}/blob", b"abc")
    s3.get_range(bucket, "blob", 0, 3)  # the parent's client and pool exist before the fork
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(bucket, queue))
    child.start()
    data, before, child_requests = queue.get(timeout=30)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert data == b"abc"
    # Fresh per-process counters, from the first look: only the child's own request is counted, and
    # a baseline read before its first request is not the parent's (a worker's deltas were negative).
    assert (before, child_requests) == (0, 1)


@pytest.mark.parametrize("uri", ["bucket/key", "http://bucket/key", "s3://", ""])
def test_parse_uri_rejects(uri):
    with pytest.raises(ValueError, match="s3://bucket"):
        s3.parse_uri(uri)


def test_fanning_out_over_more_cases_than_threads_does_not_deadlock(bucket, monkeypatch):
    """Each in-memory case load waits on its own ranged GETs; with more cases than pool threads the
    loads must not hold every thread the GETs need (it deadlocked at >= 32 cases)."""
    from brainseg.data.catalog import build_catalog
    from brainseg.data.memory import load_in_memory
    from tests.conftest import put_case, small_phantom

    for number in range(3):
        phantom = small_phantom(number, shape=(4, 16, 16))
        put_case(f"s3://{bucket}/ds", f"case-{number}", phantom.image, phantom.mask)
    cases = build_catalog(f"s3://{bucket}/ds/").cases
    monkeypatch.setattr(s3_client, "MAX_CONCURRENCY", 2)
    s3.reset_client()
    loaded = []
    worker = threading.Thread(target=lambda: loaded.extend(load_in_memory(cases)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "loading 3 cases on a pool of 2 threads deadlocked"
    assert [case.image.read_volume().shape for case in loaded] == [(4, 16, 16)] * 3
    monkeypatch.undo()
    s3.reset_client()


def test_the_one_retry_loop_retries_what_it_is_told_and_names_the_last_failure(monkeypatch):
    monkeypatch.setattr(s3_client, "RETRY_BACKOFF_S", 0.0)
    failures, noted = [botocore.exceptions.ConnectionClosedError(endpoint_url="http://s3"), s3_client._ShortBody("short")], []

    def flaky():
        if failures:
            raise failures.pop(0)
        return "bytes"

    before = s3.stats()["retries"]
    assert s3.retrying(flaky, lambda n, err: "unused", note=lambda attempt, err: noted.append(attempt)) == "bytes"
    assert noted == [1, 2] and s3.stats()["retries"] == before + 2
    with pytest.raises(s3.S3Error, match=r"^gave up after 3: S3Error: put failed$"):
        s3.retrying(lambda: (_ for _ in ()).throw(s3.S3Error("put failed")),
                    lambda n, err: f"gave up after {n}: {type(err).__name__}: {err}", attempts=3, retry_on=(s3.S3Error,))
    calls = []
    with pytest.raises(KeyError):  # not a retried kind: raised at once
        s3.retrying(lambda: calls.append(1) or {}["missing"], lambda n, err: "unused")
    assert calls == [1]
