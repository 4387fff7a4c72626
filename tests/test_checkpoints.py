"""Checkpoints: records written after their checkpoint, pruning, the local mirror per run, and
falling back to an older checkpoint when the newest cannot be trusted."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle

import pytest
import torch

from brainseg.io import s3
from brainseg.io.store import Store
from brainseg.model.artifact import load_tensors
from brainseg.run import state
from brainseg.run.checkpoint import CheckpointError, CheckpointStore


def _store(bucket: str, run: str, local=None) -> CheckpointStore:
    return CheckpointStore(Store(f"s3://{bucket}/runs", run), str(local) if local else None)


def _listing(store: CheckpointStore) -> list[str]:
    bucket, prefix = s3.parse_uri(store.store.uri)
    return sorted(info.key[len(prefix):] for info in s3.list_objects(bucket, prefix))


def _as_is(data: bytes) -> bytes:
    return data


def test_checkpoint_then_record_then_pointer_and_pruning(bucket, tmp_path):
    store = _store(bucket, "r1", tmp_path)
    for step in (5, 10, 15, 20):
        store.save(f"state at {step}".encode(), step, step // 5, keep=2)
    assert _listing(store) == ["checkpoints/latest.json", "checkpoints/step-00000015.json",
                               "checkpoints/step-00000015.pt", "checkpoints/step-00000020.json",
                               "checkpoints/step-00000020.pt"]
    assert sorted(p.name for p in (tmp_path / "r1").iterdir()) == [
        "latest.json", "step-00000015.json", "step-00000015.pt", "step-00000020.json", "step-00000020.pt"]
    data, record = store.newest(_as_is)
    assert data == b"state at 20" and record["step"] == 20 and record["source"] == "local"
    assert record["sha256"] == hashlib.sha256(data).hexdigest() and record["run"] == f"s3://{bucket}/runs/r1/"


def test_a_new_run_has_no_checkpoint(bucket, tmp_path):
    assert _store(bucket, "fresh", tmp_path).newest(_as_is) is None


def test_the_local_mirror_is_per_run(bucket, tmp_path):
    _store(bucket, "other", tmp_path).save(b"another run's state", 8, 2, keep=3)
    assert _store(bucket, "mine", tmp_path).newest(_as_is) is None
    s3_only = _store(bucket, "mine")
    s3_only.save(b"mine in S3", 4, 1, keep=3)
    data, record = _store(bucket, "mine", tmp_path).newest(_as_is)
    assert data == b"mine in S3" and record["source"] == "s3"


def test_newer_local_checkpoint_wins(bucket, tmp_path):
    _store(bucket, "r2").save(b"old, in S3", 4, 1, keep=3)
    local = tmp_path / "r2"
    local.mkdir()
    record = {"checkpoint": "step-00000008.pt", "step": 8, "epoch": 2, "bytes": 12,
              "sha256": hashlib.sha256(b"newer, local").hexdigest(), "run": f"s3://{bucket}/runs/r2/"}
    (local / "step-00000008.pt").write_bytes(b"newer, local")
    (local / "step-00000008.json").write_text(json.dumps(record))
    data, found = _store(bucket, "r2", tmp_path).newest(_as_is)
    assert data == b"newer, local" and found["source"] == "local"


@pytest.mark.parametrize("damage, reason", [
    ("checkpoints/step-00000006.pt", "s3 step-00000006.pt does not match its record"),
    ("checkpoints/step-00000006.json", "s3 step-00000006.json is not valid JSON"),
])
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(bucket, caplog, damage, reason):
    store = _store(bucket, f"damaged-{damage[-4:-1]}")
    store.save(b"step 3", 3, 1, keep=3)
    store.save(b"step 6", 6, 2, keep=3)
    s3.put_bytes(store.store.url(damage), b"{truncated")
    with caplog.at_level(logging.WARNING, logger="brainseg.run.checkpoint"):
        data, record = store.newest(_as_is)
    assert data == b"step 3" and record["step"] == 3
    assert "resuming from s3 step-00000003.pt (step 3), passing over what cannot be used" in caplog.text
    assert reason in caplog.text


@pytest.mark.parametrize("pointer", [b"not json", b'{"checkpoint": "step-00000006.pt"}', b"[1, 2]",
                                     b'{"checkpoint": "../../other/x.pt", "step": 9, "epoch": 1, "bytes": 1, '
                                     b'"sha256": "' + b"0" * 64 + b'"}'])
def test_a_malformed_pointer_is_reported_and_the_records_are_used(bucket, caplog, pointer):
    store = _store(bucket, "pointer")
    store.save(b"step 6", 6, 2, keep=3)
    s3.put_bytes(store.store.url("checkpoints/latest.json"), pointer)
    with caplog.at_level(logging.WARNING, logger="brainseg.run.checkpoint"):
        data, record = store.newest(_as_is)
    assert data == b"step 6" and "s3 latest.json" in caplog.text


def test_a_checkpoint_that_does_not_load_falls_back(bucket, caplog):
    store = _store(bucket, "unloadable")
    store.save(b"good", 2, 1, keep=3)
    store.save(b"written by something else", 4, 2, keep=3)

    def load(data: bytes) -> bytes:
        if data != b"good":
            raise ValueError("the checkpoint is refused: it holds objects other than tensors and plain values")
        return data

    with caplog.at_level(logging.WARNING, logger="brainseg.run.checkpoint"):
        assert store.newest(load)[0] == b"good"
    assert "objects other than tensors and plain values" in caplog.text


class _Settings:
    lr = 0.1


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("data, reason", [
    (lambda: _saved({"model": {"w": torch.zeros(1)}, "hp": _Settings()}),
     r"^the checkpoint is refused: it holds objects other than tensors and plain values \(the "
     r"first: tests\.test_checkpoints\._Settings\), which torch\.load\(weights_only=True\) does not load"),
    (lambda: pickle.dumps({"model": {}}, protocol=4),
     r"^the checkpoint is refused: a pickle torch\.load\(weights_only=True\) cannot read \(Unsupported operand "
     r"149\); write it with torch\.save$"),
    (lambda: b"hello world" * 10, r"^the checkpoint cannot be read as a torch file: KeyError"),
    (lambda: _saved({"w": torch.zeros(4)})[:200], r"^the checkpoint cannot be read as a torch file: RuntimeError"),
], ids=["pickled objects", "plain pickle", "text", "torn"])
def test_a_file_that_is_not_tensors_and_plain_values_is_refused_with_what_it_is(data, reason):
    with pytest.raises(ValueError, match=reason):
        load_tensors(data(), "the checkpoint")


def test_no_usable_checkpoint_lists_every_reason(bucket):
    store = _store(bucket, "r3")
    store.save(b"good", 3, 1, keep=3)
    s3.put_bytes(store.store.url("checkpoints/step-00000003.pt"), b"truncated")
    with pytest.raises(CheckpointError, match=r"s3 step-00000003.pt does not match its record \(9 bytes, expected 4"):
        store.newest(_as_is)


def test_reading_a_checkpoint_survives_dropped_connections(bucket, faults):
    store = _store(bucket, "flaky")
    store.save(b"x" * 100_000, 5, 1, keep=3)
    faults.set({"fault": "cut", "method": "GET", "key": "/checkpoints/", "times": 3})
    data, record = store.newest(_as_is)
    assert len(data) == 100_000 and faults.injected() == 3


def test_a_checkpoint_holds_exactly_the_keys_the_reader_requires():
    data = state.checkpoint_bytes(hyperparameters={}, model={}, optimizer={}, scheduler={}, scaler={}, best_model={},
                                  state={}, rng=[], sampler={}, dataset_fingerprint="f", splits={"train": ["a"]},
                                  code_version="c")
    checkpoint = state.load_checkpoint(data)
    assert checkpoint.keys() == state.CHECKPOINT_KEYS and checkpoint["splits"] == {"train": ["a"]}
    with pytest.raises(ValueError, match="checkpoint lacks splits"):
        buffer = io.BytesIO()
        torch.save({key: value for key, value in checkpoint.items() if key != "splits"}, buffer)
        state.load_checkpoint(buffer.getvalue())


def test_resuming_is_refused_for_other_hyperparameters_or_data_naming_what_changed():
    from brainseg.config import Hyperparameters
    from brainseg.run.errors import TrainingError
    from brainseg.run.resume import check_same_dataset, check_same_hyperparameters

    hp = Hyperparameters(lr=3e-4, epochs=10)
    saved = {"hyperparameters": Hyperparameters(lr=1e-3, epochs=5).to_dict(), "dataset_fingerprint": "old",
             "splits": {"train": ["a", "b"], "val": ["c"], "test": []}}
    with pytest.raises(TrainingError, match=r"from different hyperparameters \(lr: 0.001 -> 0.0003\); use the same"):
        check_same_hyperparameters(saved, hp, "r1", "step-00000005.pt")  # epochs may change, lr may not
    check_same_hyperparameters({**saved, "hyperparameters": Hyperparameters(lr=3e-4, epochs=5).to_dict()}, hp, "r1",
                               "step-00000005.pt")
    now = {"train": ["a", "b", "d"], "val": [], "test": []}
    with pytest.raises(TrainingError, match=r"changed since checkpoint step-5 \(fingerprint old -> new: train \+1 \(d\); "
                                            r"val -1 \(c\)\); resume on the same data"):
        check_same_dataset(saved, "new", now, hp, "r1", "step-5")
    check_same_dataset(saved, "new", now, Hyperparameters(allow_dataset_change=True), "r1", "step-5")  # a warning
    check_same_dataset(saved, "old", now, hp, "r1", "step-5")  # same fingerprint: nothing to check
