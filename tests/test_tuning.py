"""Hyperparameter tuning: ranges and strategies checked, SageMaker's tuning request (offline dry run
and against moto), a 2-job random search in process mode end to end with its review, and the
image's `train` program that runs a tuning job's training jobs."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import boto3
import pytest

from brainseg.io import s3
from infra.launcher import cli as launch
from infra.launcher import sagemaker_job
from infra.launcher.jobspec import build_spec
from infra.launcher.tuning import Range, TuningSpec, parse_range, training_job_name, tuning_job_name
from infra.review import cli as review
from tests.conftest import synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
ROLE = "arn:aws:iam::123456789012:role/brainseg-training"
TINY = ["channels=[8,16,32]", "patch_size=32,32,32", "res_units=1", "epochs=2", "steps_per_epoch=3",
        "num_workers=0", "max_val_cases=1", "log_every=1"]


@pytest.fixture(autouse=True)
def sdk_environment(monkeypatch):
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def _hp(pairs):
    return [arg for pair in pairs for arg in ("--hp", pair)]


@pytest.mark.parametrize("text, expected", [
    ("lr=1e-4:1e-2:log", Range("lr", "continuous", 1e-4, 1e-2, "Logarithmic")),
    ("batch_size=2:8", Range("batch_size", "integer", 2, 8, "Auto")),
    ("dropout=0:0.3", Range("dropout", "continuous", 0.0, 0.3, "Auto")),
    ("loss=[dice_ce, dice]", Range("loss", "categorical", values=("dice_ce", "dice"))),
    ("patch-size=[[64,64,64], [96,96,96]]", Range("patch_size", "categorical", values=([64, 64, 64], [96, 96, 96]))),
])
def test_range_flags(text, expected):
    assert parse_range(text) == expected


@pytest.mark.parametrize("settings, message", [
    ({"ranges": (parse_range("lr=1e-4:1e-2"),), "strategy": "Grid"}, "Grid search takes categorical ranges only"),
    ({"ranges": (parse_range("lr=1e-4:1e-2"),), "strategy": "Hyperband", "early_stopping": "Auto"},
     "Hyperband stops jobs itself"),
    ({"ranges": ()}, "at least one --range"),
    ({"ranges": (parse_range("lr=1e-4:1e-2"),), "objective": "validation:accuracy"}, "expected a published metric"),
    ({"ranges": (parse_range("lr=1e-4:1e-2"),), "strategy": "Annealing"}, "strategy 'Annealing'"),
])
def test_bad_tuning_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        TuningSpec(**settings)


@pytest.mark.parametrize("text, message", [
    ("lr=1e-2:1e-4", "expected min < max"),
    ("lr=0:1e-2:log", "Logarithmic scaling needs min > 0"),
    ("lr=1e-4:1e-2:cubic", "scaling 'cubic'"),
    ("lr=fast:slow", "'fast' is not a number"),
    ("lr", "expected name=min:max"),
])
def test_bad_ranges_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_range(text)


@pytest.mark.parametrize("text, message", [
    ("learning_rate=1e-4:1e-2", "unknown hyperparameter learning_rate"),
    ("epochs=0:5", "epochs 0: expected at least 1"),
    ("loss=[dice, hinge]", "loss 'hinge'"),
    ("output_uri=[s3://a/, s3://b/]", "set by the launcher"),
])
def test_ranges_must_be_valid_train_py_values(text, message):
    spec = build_spec({"mode": "aws", "role": ROLE, "data_uri": "s3://d/ds/", "output_uri": "s3://o/runs/"}, {})
    with pytest.raises(ValueError, match=message):
        TuningSpec(ranges=(parse_range(text),)).check(spec)
    fixed = build_spec({"mode": "aws", "role": ROLE, "data_uri": "s3://d/ds/", "output_uri": "s3://o/runs/"},
                       {"lr": 0.01})
    with pytest.raises(ValueError, match="lr is both fixed"):
        TuningSpec(ranges=(parse_range("lr=1e-4:1e-2"),)).check(fixed)


def test_random_search_draws_within_the_ranges_reproducibly():
    tuning = TuningSpec(ranges=(parse_range("lr=1e-5:1e-1"), parse_range("batch_size=2:4"),
                                parse_range("loss=[dice_ce, dice]")), strategy="Random", max_jobs=400, random_seed=7)
    draws = tuning.sample()
    assert draws == tuning.sample() and len(draws) == 400
    assert tuning.sample(8) != draws
    lrs = [d["lr"] for d in draws]
    assert all(1e-5 <= lr <= 1e-1 for lr in lrs)
    # Auto over four decades is log-uniform: about a quarter of the draws in each decade
    below = sum(lr < 1e-4 for lr in lrs) / len(lrs)
    assert 0.18 < below < 0.32
    assert {d["batch_size"] for d in draws} == {2, 3, 4} and all(isinstance(d["batch_size"], int) for d in draws)
    assert {d["loss"] for d in draws} == {"dice_ce", "dice"}


def test_grid_search_walks_every_combination():
    tuning = TuningSpec(ranges=(parse_range("loss=[dice_ce, dice]"), parse_range("batch_size=[2, 4, 8]")),
                        strategy="Grid")
    assert tuning.jobs == 6
    assert tuning.sample() == [{"loss": loss, "batch_size": b} for loss in ("dice_ce", "dice") for b in (2, 4, 8)]
    with pytest.raises(ValueError, match="needs SageMaker's tuner"):
        TuningSpec(ranges=(parse_range("lr=1e-4:1e-2"),)).sample()


def test_names_follow_sagemakers_forms():
    name = tuning_job_name("brainseg-glioma-study-with-a-long-name")
    assert len(name) <= 32 and name[-11:-5].isdigit() and name[-4:].isdigit()
    job = training_job_name(name, 3, {"lr": 0.01})
    assert job.startswith(f"{name}-003-") and len(job.rsplit("-", 1)[1]) == 8


def _tune_argv(bucket: str, *extra: str) -> list[str]:
    return ["tune", "--mode", "aws", "--role", ROLE, "--data-uri", "s3://scans/ds/", "--output-uri",
            f"s3://{bucket}/runs/", "--range", "lr=1e-4:1e-2:log", "--range", "loss=[dice_ce, dice]",
            "--hp", "epochs=20", "--max-jobs", "12", "--max-parallel-jobs", "3", *extra]


def test_tuning_dry_run_prints_the_request_offline(monkeypatch, capsys, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    tuning = tmp_path / "tuning.yaml"
    tuning.write_text("strategy: Hyperband\nmin_epochs: 3\nranges:\n  dropout: {min: 0.0, max: 0.3}\n"
                      "  lr: {min: 1e-5, max: 1e-3}\n")
    assert launch.main(_tune_argv("out-bucket", "--tuning", str(tuning), "--volume-kms-key",
                                  "arn:aws:kms:us-east-1:123456789012:key/v", "--dry-run")) == 0
    request = json.loads(capsys.readouterr().out)
    config = request["HyperParameterTuningJobConfig"]
    name = request["HyperParameterTuningJobName"]
    assert len(name) <= 32 and name.startswith("brainseg-")
    assert config["Strategy"] == "Hyperband"
    assert config["StrategyConfig"] == {"HyperbandStrategyConfig": {"MinResource": 3, "MaxResource": 20}}
    assert config["HyperParameterTuningJobObjective"] == {"MetricName": "validation:best_dice", "Type": "Maximize"}
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 12, "MaxParallelTrainingJobs": 3}
    ranges = config["ParameterRanges"]
    assert ranges["ContinuousParameterRanges"] == [  # the flag's lr replaced the file's
        {"Name": "dropout", "MinValue": "0.0", "MaxValue": "0.3", "ScalingType": "Auto"},
        {"Name": "lr", "MinValue": "0.0001", "MaxValue": "0.01", "ScalingType": "Logarithmic"}]
    assert ranges["CategoricalParameterRanges"] == [{"Name": "loss", "Values": ["dice_ce", "dice"]}]
    definition = request["TrainingJobDefinition"]
    static = definition["StaticHyperParameters"]
    assert static["epochs"] == "20" and "lr" not in static and "loss" not in static
    assert static["sagemaker_submit_directory"] == f"s3://out-bucket/runs/{name}/input/sourcedir.tar.gz"
    assert static["sagemaker_torch_distributed_enabled"] == "true"
    assert definition["CheckpointConfig"] == {"S3Uri": f"s3://out-bucket/runs/{name}/checkpoints",
                                              "LocalPath": "/opt/ml/checkpoints"}
    assert definition["ResourceConfig"]["VolumeKmsKeyId"] == "arn:aws:kms:us-east-1:123456789012:key/v"
    published = {d["Name"] for d in definition["AlgorithmSpecification"]["MetricDefinitions"]}
    assert "validation:best_dice" in published


def test_tuning_job_against_moto(bucket, capsys):
    assert launch.main(_tune_argv(bucket, "--strategy", "Random", "--early-stopping", "Auto")) == 0
    name = capsys.readouterr().out.split("submitted tuning job ")[1].split(":")[0]
    job = boto3.client("sagemaker").describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)
    assert job["HyperParameterTuningJobConfig"]["Strategy"] == "Random"
    assert job["HyperParameterTuningJobConfig"]["TrainingJobEarlyStoppingType"] == "Auto"
    with tarfile.open(fileobj=io.BytesIO(s3.get_object(bucket, f"runs/{name}/input/sourcedir.tar.gz"))) as archive:
        names = set(archive.getnames())
    assert {"train.py", "brainseg/config.py", "requirements.txt"} <= names
    assert not any("__pycache__" in n for n in names)
    manifest = json.loads(s3.get_object(bucket, f"runs/{name}/tuning.json"))
    assert manifest["strategy"] == "Random" and set(manifest["ranges"]) == {"lr", "loss"}


def test_local_mode_and_warm_pools_are_refused_for_tuning(bucket, capsys):
    argv = _tune_argv(bucket)
    assert launch.main([*argv[:2], "local", *argv[3:]]) == 2
    assert "local mode has no tuning jobs" in capsys.readouterr().err
    assert launch.main([*argv, "--keep-alive-s", "600"]) == 2
    assert "does not give its training jobs a warm pool" in capsys.readouterr().err
    assert launch.main([*argv[:2], "process", *argv[3:], "--strategy", "Bayesian"]) == 2
    assert "strategy Bayesian needs SageMaker's tuner" in capsys.readouterr().err


@pytest.mark.slow
def test_process_mode_random_search_end_to_end_and_its_review(tmp_path, capsys):
    dataset = synthetic_dataset("tune-data", 6)
    output = f"s3://{dataset.split('/')[2]}/tuning/"
    code = launch.main(["tune", "--mode", "process", "--data-uri", dataset, "--output-uri", output,
                        "--job-name", "search", *_hp(TINY), "--range", "lr=1e-3:3e-2:log", "--strategy", "Random",
                        "--max-jobs", "2", "--max-parallel-jobs", "2", "--random-seed", "3"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    name = out.split("review: brainseg-review ")[1].split()[0].rstrip("/").rsplit("/", 1)[1]
    manifest = json.loads(s3.read_uri(f"{output}{name}/tuning.json"))
    jobs = manifest["jobs"]
    assert manifest["random_seed"] == 3
    tuning = TuningSpec(ranges=(parse_range("lr=1e-3:3e-2:log"),), strategy="Random", max_jobs=2, random_seed=3)
    assert [job["hyperparameters"] for job in jobs] == tuning.sample()  # the recorded seed replays the draws
    assert [job["status"] for job in jobs] == ["completed", "completed"]
    assert len({job["hyperparameters"]["lr"] for job in jobs}) == 2
    for job in jobs:
        lines = [json.loads(line) for line in s3.read_uri(f"{output}{job['job']}/metrics/metrics.jsonl").splitlines()]
        assert job["objective"] == lines[-1]["best_val_dice"] == max(line["val_dice"] for line in lines)
        run = json.loads(s3.read_uri(f"{output}{job['job']}/run.json"))
        assert math.isclose(run["hyperparameters"]["lr"], job["hyperparameters"]["lr"])
    best = max(jobs, key=lambda job: job["objective"])
    [line] = [line for line in out.splitlines() if line.startswith(f"  {best['job']}: completed")]
    assert line.endswith("<- best")

    assert review.main([f"{output}{name}/", "--report", str(tmp_path)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].startswith(f"tuning job {name} (process, Random, Maximize validation:best_dice): 2 run(s)")
    rows = [line.split() for line in text[2:4]]
    assert [row[0] for row in rows] == sorted((job["job"] for job in jobs),
                                              key=lambda j: -next(x["objective"] for x in jobs if x["job"] == j))
    assert rows[0][3] == f"{best['hyperparameters']['lr']:.4g}"
    page = (tmp_path / "index.html").read_text()
    assert "hyperparameters that differ" in page and "<th>lr</th>" in page


def test_the_images_train_program_runs_the_driver_with_the_tuners_code(bucket, tmp_path):
    """What SageMaker runs in our image for a tuning job's training job: no code channel, the code
    in sagemaker_submit_directory; `train` unpacks it where the SDK's driver script expects it and
    hands over to that script (here one that reports what it finds)."""
    source = f"s3://{bucket}/runs/t/input/sourcedir.tar.gz"
    sagemaker_job.upload_source(source, boto3.Session())
    opt_ml = tmp_path / "opt_ml"
    drivers = opt_ml / "input" / "data" / "sm_drivers"
    drivers.mkdir(parents=True)
    (opt_ml / "input" / "config").mkdir(parents=True)
    (opt_ml / "input" / "config" / "hyperparameters.json").write_text(json.dumps(
        {"sagemaker_submit_directory": json.dumps(source), "epochs": "2"}))
    (drivers / "sm_train.sh").write_text(f"cd {opt_ml}/input/data/code && ls train.py sourcedir.tar.gz "
                                         "brainseg/config.py && echo driver-ran\n")
    env = {**os.environ, "OPT_ML": str(opt_ml)}
    done = subprocess.run([sys.executable, str(ROOT / "docker" / "train")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["brainseg/config.py", "sourcedir.tar.gz", "train.py", "driver-ran"]
    (drivers / "sm_train.sh").unlink()
    done = subprocess.run([sys.executable, str(ROOT / "docker" / "train")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "sm_train.sh: launch jobs with brainseg-launch" in done.stderr
    assert "brainseg-launch" in (opt_ml / "output" / "failure").read_text()
