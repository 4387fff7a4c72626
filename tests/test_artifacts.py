"""The run store: checkpoints before pointers, retries, pruning, and finding the newest checkpoint."""

from __future__ import annotations

import hashlib
import json

import pytest

from brainseg import s3io
from brainseg.artifacts import CheckpointError, RunStore


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


def _listing(store: RunStore) -> list[str]:
    bucket, prefix = s3io.parse_uri(store.uri)
    return sorted(info.key[len(prefix):] for info in s3io.list_objects(bucket, prefix))


def test_checkpoint_then_pointer_and_pruning(bucket, tmp_path):
    store = RunStore(f"s3://{bucket}/runs", "r1", str(tmp_path))
    for step in (5, 10, 15, 20):
        store.save_checkpoint(f"state at {step}".encode(), step, step // 5, keep=2)
    assert _listing(store) == ["checkpoints/latest.json", "checkpoints/step-00000015.pt",
                               "checkpoints/step-00000020.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-00000015.pt", "step-00000020.pt"]
    data, pointer = store.latest_checkpoint()
    assert data == b"state at 20" and pointer["step"] == 20 and pointer["source"] == "s3"
    assert pointer["sha256"] == hashlib.sha256(data).hexdigest()


def test_a_new_run_has_no_checkpoint(bucket):
    assert RunStore(f"s3://{bucket}/runs", "fresh").latest_checkpoint() is None


def test_newer_local_checkpoint_wins(bucket, tmp_path):
    store = RunStore(f"s3://{bucket}/runs", "r2", str(tmp_path))
    store.save_checkpoint(b"old", 4, 1, keep=3)
    RunStore(f"s3://{bucket}/other", "r2", str(tmp_path)).save_checkpoint(b"newer, local", 8, 2, keep=3)
    data, pointer = store.latest_checkpoint()
    assert data == b"newer, local" and pointer["source"] == "local"


def test_a_corrupt_checkpoint_is_refused(bucket):
    store = RunStore(f"s3://{bucket}/runs", "r3")
    store.save_checkpoint(b"good", 3, 1, keep=3)
    s3io.put_bytes(store.url("checkpoints/step-00000003.pt"), b"truncated")
    with pytest.raises(CheckpointError, match="step-00000003.pt does not match its SHA-256"):
        store.latest_checkpoint()


def test_a_failed_upload_is_retried(bucket):
    store = RunStore(f"s3://{bucket}/runs", "r4")
    hook, state = _fail_puts("step-00000002.pt", times=9)  # more than botocore's own 8 attempts
    s3io.client().meta.events.register_first("before-send.s3.PutObject", hook)
    try:
        store.save_checkpoint(b"second", 2, 1, keep=3)
    finally:
        s3io.client().meta.events.unregister("before-send.s3.PutObject", hook)
    assert state["left"] == 0 and store.latest_checkpoint()[0] == b"second"


def test_a_failed_upload_never_moves_the_pointer(bucket, monkeypatch):
    monkeypatch.setattr("brainseg.artifacts.UPLOAD_BACKOFF_S", 0.0)
    store = RunStore(f"s3://{bucket}/runs", "r5")
    store.save_checkpoint(b"first", 1, 1, keep=3)
    hook, _ = _fail_puts("step-00000002.pt", times=10**6, status=403, code="AccessDenied")
    s3io.client().meta.events.register_first("before-send.s3.PutObject", hook)
    try:
        with pytest.raises(s3io.S3Error, match="step-00000002.pt"):
            store.save_checkpoint(b"second", 2, 2, keep=3)
    finally:
        s3io.client().meta.events.unregister("before-send.s3.PutObject", hook)
    assert json.loads(s3io.read_uri(store.url("checkpoints/latest.json")))["checkpoint"] == "step-00000001.pt"
    assert store.latest_checkpoint()[0] == b"first"
