"""A SageMaker job after submission: status, logs, stop, attach and the job list against moto's
SageMaker and CloudWatch Logs; the review asking SageMaker for a run's real status."""

from __future__ import annotations

import json
import time

import boto3
import pytest
from botocore.awsrequest import AWSResponse

from brainseg.io import s3
from infra.launcher import cli as launch
from infra.launcher import lifecycle
from infra.review import cli as review
from infra.review.runs import ask_sagemaker, load_run

ROLE = "arn:aws:iam::123456789012:role/brainseg-training"
GROUP = "/aws/sagemaker/TrainingJobs"


def _create_job(name: str, output_uri: str = "s3://results/runs/") -> None:
    boto3.client("sagemaker").create_training_job(
        TrainingJobName=name, RoleArn=ROLE, HyperParameters={"output_uri": output_uri, "epochs": "2"},
        AlgorithmSpecification={"TrainingImage": "123456789012.dkr.ecr.us-east-1.amazonaws.com/brainseg-train:1",
                                "TrainingInputMode": "File"},
        OutputDataConfig={"S3OutputPath": output_uri},
        ResourceConfig={"InstanceType": "ml.g5.12xlarge", "InstanceCount": 2, "VolumeSizeInGB": 100},
        StoppingCondition={"MaxRuntimeInSeconds": 3600})


BASE_MS = int(time.time() * 1000)  # log events' times: offsets from this


def _log(name: str, stream: str, lines: list[tuple[int, str]]) -> None:
    logs = boto3.client("logs")
    try:
        logs.create_log_group(logGroupName=GROUP)
    except logs.exceptions.ResourceAlreadyExistsException:
        pass
    logs.create_log_stream(logGroupName=GROUP, logStreamName=f"{name}/{stream}")
    logs.put_log_events(logGroupName=GROUP, logStreamName=f"{name}/{stream}",
                        logEvents=[{"timestamp": BASE_MS + offset, "message": text} for offset, text in lines])


@pytest.fixture
def job() -> str:
    name = f"brainseg-{time.time_ns() % 10**14:014d}"
    _create_job(name)
    _log(name, "algo-1-1795000000", [(0, "epoch_metrics epoch=1 val_dice=0.41"), (20, "epoch_metrics epoch=2")])
    _log(name, "algo-2-1795000000", [(10, "under torchrun: 4 process(es) on this host, 8 in all")])
    return name


def test_status_reports_the_job_and_where_its_run_is(job, capsys):
    assert launch.main(["status", job]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{job}: Completed"
    assert "instance type: ml.g5.12xlarge" in out and "instance count: 2" in out
    assert f"run: s3://results/runs/{job}/" in out
    assert launch.main(["status", job, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["status"] == "Completed" and info["run"] == f"s3://results/runs/{job}/"


def test_logs_interleave_every_instance_in_time_order(job, capsys):
    assert launch.main(["logs", job]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "algo-1 | epoch_metrics epoch=1 val_dice=0.41", "algo-2 | under torchrun: 4 process(es) on this host, 8 in all",
        "algo-1 | epoch_metrics epoch=2"]


def test_attach_prints_new_lines_only_and_returns_with_the_final_status(job, capsys):
    session = boto3.Session()
    reader = lifecycle.LogReader(job, session)
    assert len(reader.new_lines()) == 3
    assert reader.new_lines() == []  # read forward from where it stopped
    _log(job, "algo-3-1795000000", [(30, "late line")])
    assert reader.new_lines() == ["algo-3 | late line"]
    assert launch.main(["attach", job, "--interval", "0.1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"{job}: Completed" and "algo-3 | late line" in out


def test_jobs_lists_the_newest_first(capsys):
    names = [f"brainseg-list-{i}-{time.time_ns() % 10**9}" for i in range(3)]
    for name in names:
        _create_job(name)
    _create_job(f"other-{time.time_ns() % 10**9}")
    assert launch.main(["jobs", "--name-contains", "brainseg-list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == names[::-1]
    assert launch.main(["jobs", "--name-contains", "brainseg-list", "--max", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_stop_sends_stop_training_job_for_a_running_job(job, monkeypatch):
    """moto's jobs complete at once and it has no StopTrainingJob: SageMaker's answer is made
    InProgress and the stop request is captured as it would be sent."""
    session = boto3.Session()
    stopped = []

    def in_progress(parsed, **_):
        parsed["TrainingJobStatus"] = "InProgress"

    def capture(params, **_):
        stopped.append(params)
        return AWSResponse("https://captured.invalid", 200, {}, None), {}
    session.events.register("after-call.sagemaker.DescribeTrainingJob", in_progress)
    session.events.register("before-call.sagemaker.StopTrainingJob", lambda model, **kw: capture(kw["params"]))
    assert lifecycle.stop(job, session) == "InProgress"
    assert [params["body"] for params in stopped] == [json.dumps({"TrainingJobName": job}).encode()]
    assert lifecycle.stop(job, boto3.Session()) == "Completed"  # an ended job is left alone


@pytest.mark.parametrize("command", ["status", "logs", "stop", "attach"])
def test_an_unknown_job_is_one_line(command, capsys):
    assert launch.main([command, "brainseg-no-such-job"]) == 2
    assert capsys.readouterr().err == "error: no training job brainseg-no-such-job in us-east-1\n"


def _running_run(bucket: str, name: str) -> str:
    uri = f"s3://{bucket}/runs/{name}/"
    s3.put_bytes(uri + "run.json", json.dumps(
        {"status": "running", "started": time.time() - 600, "hyperparameters": {"epochs": 2}}).encode())
    return uri


def test_review_asks_sagemaker_when_run_json_still_says_running(bucket, capsys):
    """The job ended (moto's jobs complete at once) but its run.json was never finished: the review
    shows the job's status instead of a run that looks alive; without asking, it cannot know."""
    name = f"brainseg-ended-{time.time_ns() % 10**9}"
    _create_job(name, f"s3://{bucket}/runs/")
    uri = _running_run(bucket, name)
    assert review.main([uri]) == 0
    assert f"{name:34}" in (out := capsys.readouterr().out) and "job Completed" in out
    assert review.main([uri, "--no-job-status"]) == 0
    assert "job Completed" not in (out := capsys.readouterr().out) and " running " in out
    local = _running_run(bucket, "proc-20261124010101")  # a process-mode run: no SageMaker job of that name
    assert review.main([local]) == 0 and " running " in capsys.readouterr().out


def test_a_failed_jobs_reason_becomes_a_problem_of_its_run(bucket):
    name = f"brainseg-killed-{time.time_ns() % 10**9}"
    _create_job(name, f"s3://{bucket}/runs/")
    run = load_run(_running_run(bucket, name))
    assert run.running
    session = boto3.Session()
    session.events.register("after-call.sagemaker.DescribeTrainingJob", lambda parsed, **_: parsed.update(
        TrainingJobStatus="Failed", FailureReason="AlgorithmError: killed (out of memory)"))
    ask_sagemaker([run], session)
    assert not run.running and run.status_text == "job Failed"
    assert run.problems[0] == "SageMaker job Failed: AlgorithmError: killed (out of memory)"
