"""One writer per run folder: conditional claims, heartbeats, take-overs and refusals, against moto."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from brainseg.commands import train
from brainseg.io import s3
from brainseg.io.store import Store
from brainseg.run import ownership
from brainseg.run.ownership import RunLock, RunTaken


@pytest.fixture(autouse=True)
def quick_heartbeat(monkeypatch):
    monkeypatch.setattr(ownership, "HEARTBEAT_S", 0.3)
    monkeypatch.setattr(ownership, "STALE_AFTER_S", 1.5)


def _claim(bucket: str, run: str, **record) -> None:
    s3.put_bytes(f"s3://{bucket}/runs/{run}/owner.json", json.dumps(record).encode())


def test_a_second_job_is_refused_while_the_first_is_alive(bucket):
    first = RunLock(f"s3://{bucket}/runs", "r1", "job-a")
    first.acquire()
    try:
        second = RunLock(f"s3://{bucket}/runs", "r1", "job-b")
        started = time.monotonic()
        with pytest.raises(RunTaken, match=r"run r1 is being written by another job: job-a \(host .*pass another "
                                           r"--run-name"):
            second.acquire()
        assert time.monotonic() - started < 1.5  # decided by a heartbeat, before the claim could go stale
    finally:
        first.release("finished")


def test_a_released_run_is_taken_over_at_once(bucket, caplog):
    first = RunLock(f"s3://{bucket}/runs", "r2", "job-a")
    first.acquire()
    first.release("interrupted")
    released = json.loads(s3.read_uri(f"s3://{bucket}/runs/r2/owner.json"))
    assert released["released"] is True and released["status"] == "interrupted"
    second = RunLock(f"s3://{bucket}/runs", "r2", "job-a")
    started = time.monotonic()
    with caplog.at_level("INFO", logger="brainseg.run.ownership"):
        second.acquire()
    second.release("finished")
    assert time.monotonic() - started < 0.5 and "it was released" in caplog.text


def test_a_claim_left_by_a_dead_process_of_this_machine_is_taken_over_at_once(bucket, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    _claim(bucket, "r3", token="x", job="", host="here", pid=dead.pid, machine=ownership._machine(),
           heartbeat=time.time())
    lock = RunLock(f"s3://{bucket}/runs", "r3")
    with caplog.at_level("INFO", logger="brainseg.run.ownership"):
        lock.acquire()
    lock.release("finished")
    assert "its process no longer exists" in caplog.text


def test_a_claim_that_stops_changing_is_taken_over_when_stale(bucket, caplog, monkeypatch):
    monkeypatch.setattr(ownership, "STALE_AFTER_S", 3.0)
    _claim(bucket, "r4", token="x", job="lost-instance", host="algo-1", pid=7, machine="another machine",
           heartbeat=time.time())
    lock = RunLock(f"s3://{bucket}/runs", "r4")
    started = time.monotonic()
    with caplog.at_level("INFO", logger="brainseg.run.ownership"):
        lock.acquire()
    lock.release("finished")
    assert time.monotonic() - started >= 2.0  # stale after 3 s, counted from S3's second-resolution clock
    assert "watching whether it is alive" in caplog.text and "has not changed for" in caplog.text


def test_an_owner_notices_a_take_over_and_stops_writing(bucket):
    lock = RunLock(f"s3://{bucket}/runs", "r5", "job-a")
    lock.acquire()
    store = Store(f"s3://{bucket}/runs", "r5", before_write=lock.check)
    store.put_json("run.json", {"status": "running"})
    _claim(bucket, "r5", token="y", job="job-b", host="h", pid=1, machine="m", heartbeat=time.time())
    deadline = time.monotonic() + 5
    while not lock.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(RunTaken, match="another job took over run r5: job-b"):
        store.put_json("run.json", {"status": "failed"})
    lock.release("failed")
    assert json.loads(s3.read_uri(f"s3://{bucket}/runs/r5/run.json")) == {"status": "running"}
    assert json.loads(s3.read_uri(f"s3://{bucket}/runs/r5/owner.json"))["job"] == "job-b"


def test_train_refuses_a_run_another_job_writes_and_leaves_it_alone(bucket, capsys):
    output = f"s3://{bucket}/runs"
    owner = RunLock(output, "shared", "job-a")
    owner.acquire()
    Store(output, "shared").put_json("run.json", {"status": "running", "hyperparameters": {"lr": 0.001}})
    try:
        code = train.main(["--data-uri", f"s3://{bucket}/data/", "--output-uri", output, "--run-name", "shared",
                           "--lr", "0.1"])
    finally:
        owner.release("finished")
    assert code == 2
    assert "run shared is being written by another job: job-a" in capsys.readouterr().out
    assert json.loads(s3.read_uri(f"{output}/shared/run.json"))["status"] == "running"


def test_a_claim_written_but_unanswered_is_recognised_as_our_own(bucket, faults):
    faults.set({"fault": "lost-reply", "method": "PUT", "key": "/r6/owner.json", "every": 2})
    lock = RunLock(f"s3://{bucket}/runs", "r6", "job-a")
    lock.acquire()  # the create is carried out, its answer lost; botocore's retry meets it (412)
    time.sleep(4 * ownership.HEARTBEAT_S)  # heartbeats too, every other one unanswered
    assert not lock.lost
    lock.release("finished")
    record = json.loads(s3.read_uri(f"s3://{bucket}/runs/r6/owner.json"))
    assert record["released"] is True and faults.injected() >= 2
