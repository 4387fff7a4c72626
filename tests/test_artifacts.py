"""The run store's uploads: retried, and a failed checkpoint upload never moves its record or pointer."""

from __future__ import annotations

import json

import pytest

from brainseg.io import s3
from brainseg.io.store import Store
from brainseg.run.checkpoint import CheckpointStore


def _fail_puts(key_part: str, times: int, status: int = 500, code: str = "InternalError"):
    """A botocore hook answering PUTs of keys containing ``key_part`` with an error, ``times`` times."""
    state = {"left": times}

    def hook(request, **_):
        if request.method == "PUT" and key_part in request.url and state["left"] > 0:
            state["left"] -= 1
            from botocore.awsrequest import AWSResponse

            class Raw:
                def stream(self, **_):
                    yield f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
            return AWSResponse(request.url, status, {}, Raw())
        return None
    return hook, state


def test_a_failed_upload_is_retried(bucket):
    store = CheckpointStore(Store(f"s3://{bucket}/runs", "r4"))
    hook, state = _fail_puts("step-00000002.pt", times=9)  # more than botocore's own 8 attempts
    s3.client().meta.events.register_first("before-send.s3.PutObject", hook)
    try:
        store.save(b"second", 2, 1, keep=3)
    finally:
        s3.client().meta.events.unregister("before-send.s3.PutObject", hook)
    assert state["left"] == 0 and store.newest(bytes)[0] == b"second"


def test_a_failed_upload_never_moves_the_pointer(bucket, monkeypatch):
    monkeypatch.setattr("brainseg.io.store.UPLOAD_BACKOFF_S", 0.0)
    store = CheckpointStore(Store(f"s3://{bucket}/runs", "r5"))
    store.save(b"first", 1, 1, keep=3)
    hook, _ = _fail_puts("step-00000002.pt", times=10**6, status=403, code="AccessDenied")
    s3.client().meta.events.register_first("before-send.s3.PutObject", hook)
    try:
        with pytest.raises(s3.S3Error, match="step-00000002.pt"):
            store.save(b"second", 2, 2, keep=3)
    finally:
        s3.client().meta.events.unregister("before-send.s3.PutObject", hook)
    assert json.loads(s3.read_uri(store.store.url("checkpoints/latest.json")))["checkpoint"] == "step-00000001.pt"
    assert s3.read_uri(store.store.url("checkpoints/step-00000002.json")) is None
    assert store.newest(bytes)[0] == b"first"
