"""The launcher: job settings, process mode with the SageMaker container contract, the SDK v3
request against moto's SageMaker and S3, the dry run, the IAM policy, and bad input."""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import boto3
import numpy as np
import pytest

from brainseg.commands import predict, train
from brainseg.flags import parse_hyperparameters
from brainseg.io import s3
from brainseg.metric_lines import EPOCH, METRIC_DEFINITIONS, TEST
from infra.launcher import cli as launch
from infra.launcher import process_job, sagemaker_job, storage
from infra.launcher.jobspec import build_spec, parse_overrides, sagemaker_cli_args
from infra.launcher.plan import distribution_text, image_text
from infra.review import cli as review
from infra.review.runs import list_runs
from tests.conftest import synthetic_dataset
from tests.policy import S3Calls, allowed, request

ROOT = Path(__file__).resolve().parents[1]
TINY = ["channels=[8,16,32]", "patch_size=32,32,32", "res_units=1", "epochs=2", "steps_per_epoch=3",
        "num_workers=0", "max_val_cases=1", "log_every=1"]
ROLE = "arn:aws:iam::123456789012:role/brainseg-training"
MLFLOW = "arn:aws:sagemaker:eu-west-1:123456789012:mlflow-tracking-server/brainseg"


@pytest.fixture(autouse=True)
def sdk_environment(monkeypatch):
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="module")
def dataset() -> str:
    return synthetic_dataset("launch-data", 8)


@pytest.fixture(scope="module")
def process_run(dataset, tmp_path_factory):
    """One process-mode job; its real log is what the metric definitions must match."""
    output = f"s3://{dataset.split('/')[2]}/runs"
    spec = build_spec({"mode": "process", "data_uri": dataset, "output_uri": output, "job_name": "proc"},
                      parse_overrides(TINY))
    root = tmp_path_factory.mktemp("process")
    sink = io.StringIO()
    code = process_job.run(spec, "proc-1", root, sink=sink)
    return {"code": code, "log": sink.getvalue(), "root": root, "output": output}


def test_process_mode_runs_train_py_under_the_container_contract(process_run):
    assert process_run["code"] == 0, process_run["log"][-3000:]
    opt_ml = process_run["root"] / "algo-1" / "opt" / "ml"
    assert (opt_ml / "model" / "model.pt").is_file()  # SM_MODEL_DIR
    assert sorted(p.name for p in (opt_ml / "checkpoints" / "proc-1").iterdir())[-1] == "step-00000006.pt"  # SM_CHECKPOINT_DIR/<run>
    hps = json.loads((opt_ml / "input" / "config" / "hyperparameters.json").read_text())
    assert hps["patch_size"] == "[32, 32, 32]" and hps["epochs"] == "2"  # strings, as SageMaker writes them
    summary = json.loads(s3.read_uri(f"{process_run['output']}/proc-1/summary.json"))
    assert summary["run_name"] == "proc-1" and summary["hyperparameters"]["patch_size"] == [32, 32, 32]
    assert "ignoring arguments" not in process_run["log"]
    assert "under torchrun: 1 process(es) on this host, 1 in all" in process_run["log"]  # one host, no GPU


@pytest.mark.slow
def test_a_process_mode_job_that_refuses_its_input_ends_with_its_reason_not_a_torchrun_traceback(bucket, tmp_path):
    spec = build_spec({"mode": "process", "data_uri": f"s3://{bucket}/nothing-here/", "output_uri": f"s3://{bucket}/runs",
                       "job_name": "empty"}, parse_overrides(TINY))
    sink = io.StringIO()
    code = process_job.run(spec, "empty-1", tmp_path, sink=sink)
    log = sink.getvalue()
    assert code == 2, log
    assert "ERROR brainseg.train: no objects under" in log and "Traceback" not in log and "ChildFailedError" not in log, log


def test_process_mode_job_names_match_the_sdks_and_leave_no_folders(dataset, tmp_path, monkeypatch, capsys):
    from sagemaker.train.utils import _get_unique_name
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    spec = build_spec({"mode": "process", "job_name": "names"}, {})
    assert re.fullmatch(r"names-\d{14}", spec.unique_job_name())
    assert len(spec.unique_job_name()) == len(_get_unique_name("names"))
    output = f"s3://{dataset.split('/')[2]}/named/"
    assert launch.main(["--mode", "process", "--data-uri", dataset, "--output-uri", output, "--job-name", "names",
                        *_hp_args(TINY), "--hp", "epochs=1"]) == 0
    assert re.search(r"artifacts: s3://\S+/named/names-\d{14}/", capsys.readouterr().out)
    assert list(tmp_path.iterdir()) == []  # the container directories are gone


def _hp_args(pairs: list[str]) -> list[str]:
    return [arg for pair in pairs for arg in ("--hp", pair)]


def test_process_mode_runs_an_lr_range_test_and_the_review_plots_it(dataset, tmp_path, capsys):
    output = f"s3://{dataset.split('/')[2]}/lr-find/"
    assert launch.main(["--mode", "process", "--data-uri", dataset, "--output-uri", output, "--job-name", "lrf",
                        *_hp_args(TINY), *_hp_args(["task=lr_find", "lr_find_steps=16", "lr_find_max=10",
                                                    "log_every=4"])]) == 0
    printed = capsys.readouterr().out
    assert "suggested_lr:" in printed
    [run] = list_runs(output)
    curve = run.lr_find
    assert run.status == "finished" and not run.problems and not run.per_case
    assert len(curve["lrs"]) == len(curve["losses"]) == curve["steps"] <= 16
    assert curve["lrs"][0] == pytest.approx(1e-7) and np.allclose(np.diff(np.log(curve["lrs"])),
                                                                   np.log(10 / 1e-7) / 15)
    assert curve["lrs"][0] <= curve["suggested_lr"] <= curve["lrs"][-1]
    assert s3.read_uri(run.uri + "model/model.pt") is None and s3.read_uri(run.uri + "checkpoints/") is None
    assert review.main([run.uri, "--report", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert f"{run.name}: learning-rate range test: suggested lr {curve['suggested_lr']:.2e}" in text
    assert (tmp_path / "lr_find.png").stat().st_size > 10_000
    assert "Learning-rate range tests" in (tmp_path / "index.html").read_text()


def test_metric_definitions_match_the_scripts_real_log_lines(process_run):
    """The log holds a progress line for every step as well; the epoch metrics match only the two
    epoch lines (the progress lines share lr, patches_per_s and data_wait_fraction)."""
    log = process_run["log"]
    assert log.count("progress phase=train step=") == 6
    expected = {"train:loss", "validation:dice", "validation:iou", "validation:best_dice", "train:lr", "train:patches_per_s",
                "train:data_wait_fraction", "test:dice", "test:dice_median", "test:iou", "test:hd95",
                "train:gets_per_patch", "train:request_cost_usd", "validation:lesion_dice", "test:lesion_dice",
                "test:lesion_hd95"}
    found = {}
    for definition in METRIC_DEFINITIONS:
        values = [float(m.group(1)) for m in re.finditer(definition["Regex"], log)]
        if values:
            found[definition["Name"]] = values
    assert set(found) == expected, set(found) ^ expected
    assert len(found["test:dice"]) == 1
    lines = [json.loads(line) for line in s3.read_uri(f"{process_run['output']}/proc-1/metrics/metrics.jsonl")
             .splitlines()]
    for metric, field, tolerance in (("validation:dice", "val_dice", 1e-4), ("validation:iou", "val_iou", 1e-4),
                                     ("validation:best_dice", "best_val_dice", 1e-4),
                                     ("train:loss", "train_loss", 1e-4), ("train:lr", "lr", 1e-3),
                                     ("train:patches_per_s", "patches_per_s", 0.01),
                                     ("train:data_wait_fraction", "data_wait_fraction", 1e-3),
                                     ("train:gets_per_patch", "gets_per_patch", 0.01),
                                     ("train:request_cost_usd", "request_cost_usd", 1e-4)):
        assert found[metric] == pytest.approx([line[field] for line in lines], rel=tolerance, abs=tolerance), metric


def test_a_gpu_runs_memory_peak_is_published_from_its_epoch_line():
    """Only a CUDA run writes gpu_memory_gib (the CPU runs above have none): its regex, checked here."""
    line = "2026-01-01 INFO brainseg.train: " + EPOCH.format(
        {"epoch": 1, "train_loss": 0.5, "val_dice": 0.3, "patches_per_s": 6.7, "gpu_memory_gib": 17.25, "seconds": 9.0})
    assert line.endswith("seconds=9.0 gpu_memory_gib=17.25")
    by_name = {d["Name"]: d["Regex"] for d in METRIC_DEFINITIONS}
    assert float(re.search(by_name["train:gpu_memory_gib"], line).group(1)) == 17.25


def test_autoencoder_metric_lines_are_matched_too():
    line = "2026-01-01 INFO brainseg.train: " + EPOCH.format(
        {"epoch": 2, "train_loss": 0.1, "val_loss": 0.0421, "lr": 0.001, "patches_per_s": 3.0,
         "data_wait_fraction": 0.01, "seconds": 1.0})
    by_name = {d["Name"]: d["Regex"] for d in METRIC_DEFINITIONS}
    assert float(re.search(by_name["validation:loss"], line).group(1)) == 0.0421
    assert re.search(by_name["validation:dice"], line) is None
    test_line = TEST.format({"test_loss": 0.05, "cases": 3, "best_epoch": 2})
    assert float(re.search(by_name["test:loss"], test_line).group(1)) == 0.05


def test_hyperparameters_travel_as_sagemaker_passes_them():
    from sagemaker.train.container_drivers.common.utils import hyperparameters_to_cli_args, safe_serialize
    hps = {"patch_size": [64, 64, 32], "augment": False, "lr": 0.0003, "model": "dynunet",
           "data_uri": "s3://d/x/", "output_uri": "s3://o/"}
    as_request = {key: safe_serialize(value) for key, value in hps.items()}  # what CreateTrainingJob carries
    assert sagemaker_cli_args(hps) == hyperparameters_to_cli_args(as_request)
    parsed, unknown = parse_hyperparameters(hyperparameters_to_cli_args(as_request))
    assert not unknown and parsed.patch_size == (64, 64, 32) and parsed.augment is False
    assert parsed.lr == 0.0003 and parsed.model == "dynunet"


def _capture(session: boto3.Session) -> list:
    requests = []
    session.events.register("before-parameter-build.sagemaker.CreateTrainingJob",
                            lambda params, **_: requests.append(json.loads(json.dumps(params, default=str))))
    return requests


def test_aws_mode_request_against_moto(bucket, process_run):
    output = f"s3://{bucket}/runs/"
    spec = build_spec({"mode": "aws", "data_uri": "s3://data-bucket/ds/", "output_uri": output, "role": ROLE,
                       "image_uri": "123456789012.dkr.ecr.us-east-1.amazonaws.com/brainseg-train:1",
                       "instance_type": "ml.g5.2xlarge", "instance_count": 2, "spot": True, "max_run_s": 7200,
                       "volume_kms_key": "arn:aws:kms:us-east-1:123456789012:key/vol",
                       "output_kms_key": "arn:aws:kms:us-east-1:123456789012:key/out",
                       "subnets": "subnet-1,subnet-2", "security_group_ids": ["sg-1"],
                       "inter_container_encryption": True, "tags": {"project": "brainseg"}},
                      parse_overrides(["epochs=3", "patch_size=[64,64,64]", "augment=false"]))
    session = boto3.Session(region_name="us-east-1")
    requests = _capture(session)
    job_name = sagemaker_job.submit(spec, session)
    [request] = requests
    assert request["TrainingJobName"] == job_name and job_name.startswith("brainseg-")
    assert request["AlgorithmSpecification"]["TrainingImage"] == spec.image_uri
    assert request["HyperParameters"] == {"epochs": "3", "patch_size": "[64, 64, 64]", "augment": "false",
                                          "data_uri": "s3://data-bucket/ds/", "output_uri": output}
    assert not request["InputDataConfig"] or all(c["ChannelName"] in ("code", "sm_drivers")
                                                  for c in request["InputDataConfig"])  # no dataset channel
    assert request["ResourceConfig"] == {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 2, "VolumeSizeInGB": 100,
                                         "VolumeKmsKeyId": spec.volume_kms_key}
    assert request["EnableManagedSpotTraining"] is True
    stopping = request["StoppingCondition"]
    assert stopping["MaxRuntimeInSeconds"] == 7200 and stopping["MaxWaitTimeInSeconds"] >= 7200
    assert request["CheckpointConfig"]["LocalPath"] == "/opt/ml/checkpoints"
    assert request["CheckpointConfig"]["S3Uri"].startswith(f"{output}brainseg/{job_name}/")
    assert request["OutputDataConfig"]["S3OutputPath"] == output
    assert request["OutputDataConfig"]["KmsKeyId"] == spec.output_kms_key
    assert request["VpcConfig"] == {"Subnets": ["subnet-1", "subnet-2"], "SecurityGroupIds": ["sg-1"]}
    assert request["EnableInterContainerTrafficEncryption"] is True
    assert {"Key": "project", "Value": "brainseg"} in request["Tags"]
    assert request["RoleArn"] == ROLE
    # the autoencoder's losses and the GPU's memory are not in a CPU segmentation run's log (their
    # regexes are checked on formatted lines below)
    for definition in request["AlgorithmSpecification"]["MetricDefinitions"]:
        if definition["Name"] not in ("validation:loss", "validation:best_loss", "test:loss", "train:gpu_memory_gib"):
            assert re.search(definition["Regex"], process_run["log"]), definition

    code_prefix = f"runs/brainseg/{job_name}/input/"
    landed = {info.key[len(code_prefix):] for info in s3.list_objects(bucket, code_prefix)}
    sources = {f"code/{p.relative_to(ROOT / 'entry_point').as_posix()}" for p in (ROOT / "entry_point").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert sources <= landed, sorted(sources - landed)
    assert "code/requirements.txt" in landed
    distributed = json.loads(s3.get_object(bucket, code_prefix + "sm_drivers/distributed.json"))
    assert distributed["process_count_per_node"] is None  # the driver's default: SM_NUM_GPUS per instance
    assert b"torchrun_driver.py" in s3.get_object(bucket, code_prefix + "sm_drivers/sm_train.sh")
    job = session.client("sagemaker").describe_training_job(TrainingJobName=job_name)
    assert job["RoleArn"] == ROLE


def test_prebuilt_image_gets_the_requirements_file(bucket, caplog):
    """The SDK knows no prebuilt image of the pinned torch: the newest it knows, and a warning that
    names both versions and the way to the pinned ones."""
    from sagemaker.core.image_uris import config_for_framework
    versions = config_for_framework("pytorch")["training"]["versions"]
    newest = max(versions, key=lambda v: tuple(map(int, v.split("."))))
    spec = build_spec({"mode": "aws", "data_uri": "s3://d/ds/", "output_uri": f"s3://{bucket}/r/", "role": ROLE}, {})
    request = sagemaker_job.dry_run_request(replace(spec, region="eu-west-1"))
    py_version = versions[newest]["py_versions"][-1]
    assert request["AlgorithmSpecification"]["TrainingImage"] == \
        f"763104351884.dkr.ecr.eu-west-1.amazonaws.com/pytorch-training:{newest}-gpu-{py_version}"
    assert sagemaker_job.PINNED_TORCH not in versions
    assert f"runs torch {newest} instead of the pinned {sagemaker_job.PINNED_TORCH}" in caplog.text
    assert "VARIANT=cuda bash docker/build.sh" in caplog.text


def test_the_pinned_torch_is_one_version_everywhere():
    pin = f"torch=={sagemaker_job.PINNED_TORCH}"
    assert pin in (ROOT / "requirements.txt").read_text().splitlines()
    assert f"ARG TORCH_SPEC={pin}" in (ROOT / "docker" / "Dockerfile").read_text()
    assert f"TORCH_SPEC=${{TORCH_SPEC:-{pin}}}" in (ROOT / "docker" / "build.sh").read_text()


def test_dry_run_prints_the_request_and_submits_nothing(bucket, capsys):
    jobs = boto3.client("sagemaker", region_name="us-east-1").list_training_jobs()["TrainingJobSummaries"]
    code = launch.main(["--mode", "aws", "--role", ROLE, "--data-uri", "s3://d/ds/", "--output-uri",
                        f"s3://{bucket}/runs/", "--hp", "epochs=4", "--spot", "--dry-run"])
    assert code == 0
    captured = capsys.readouterr()
    request = json.loads(captured.out)
    assert request["HyperParameters"]["epochs"] == "4" and request["EnableManagedSpotTraining"] is True
    assert "instances:    1 x ml.g5.xlarge (1 GPU(s) each), spot" in captured.err
    assert "distribution: torchrun, 1 process(es) per host (one per GPU), 1 in all" in captured.err
    assert re.search(r"image: +\S+pytorch-training:2\.10\.0-gpu-py\d+ \(SageMaker's prebuilt PyTorch training image: "
                     r"torch 2\.10\.0, not the pinned 2\.13\.0", captured.err), captured.err
    assert list(s3.list_objects(bucket, "")) == []
    after = boto3.client("sagemaker", region_name="us-east-1").list_training_jobs()["TrainingJobSummaries"]
    assert len(after) == len(jobs)


def test_the_cache_and_volume_are_sized_to_the_data_or_their_cost_is_stated():
    brats = storage.DatasetSize(objects=775_000, bytes=110 * 10**9, median_object_bytes=140_000)  # single-frame
    sized = storage.plan_storage(brats, None, None)
    assert (sized.cache_gb, sized.volume_gb, sized.hit_fraction, sized.fee_per_hour) == (121.0, 151, 1.0, 0.0)
    capped = storage.plan_storage(brats, 22.0, None)  # the user's cache: the volume still holds it
    assert (capped.cache_gb, capped.volume_gb, capped.chose_cache, capped.chose_volume) == (22.0, 100, False, True)
    assert capped.hit_fraction == pytest.approx(0.2)
    gets = 0.8 * storage.COLD_GETS_PER_PATCH["single-frame"]
    assert capped.fee_per_hour == pytest.approx(gets * 6.74 * 3600 * 0.0004 / 1000)
    text = storage.storage_text(capped)
    assert "--cache-gb 22 (as you set it); volume 100 GB (sized to hold the cache)" in text
    assert f"the cache holds 20% of the data: at least 80% of training reads go to S3 every epoch, ${capped.fee_per_hour:.2f}/h or more" \
        in text and "brainseg-pack" in text
    volume = storage.plan_storage(brats, None, 100)  # the user's volume: the cache fits in it
    assert (volume.cache_gb, volume.volume_gb, volume.chose_volume) == (70.0, 100, False)
    here = storage.plan_storage(brats, None, None, free_gb=50.0)  # process mode: this machine's free space
    assert (here.cache_gb, here.volume_gb) == (45.0, 0) and "volume" not in storage.storage_text(here)
    packed = storage.plan_storage(replace(brats, objects=6_255, median_object_bytes=18 * 2**20), 22.0, None)
    assert packed.dataset.kind == "packed" and packed.fee_per_hour < capped.fee_per_hour / 10
    small = storage.plan_storage(storage.DatasetSize(100, 5 * 10**9, 140_000), None, None)
    assert (small.cache_gb, small.volume_gb) == (20.0, 100)  # never below the defaults


def test_the_dry_run_lists_the_data_and_sizes_the_job_to_it(dataset, bucket, capsys):
    assert launch.main(["--mode", "aws", "--role", ROLE, "--data-uri", dataset, "--output-uri",
                        f"s3://{bucket}/runs/", "--dry-run"]) == 0
    captured = capsys.readouterr()
    request = json.loads(captured.out)
    listed = [info for info in s3.list_tree(dataset.split("/")[2], "ds/") if "/.brainseg/" not in info.key]
    assert f"data: {len(listed)} objects, {sum(i.size for i in listed) / 1e9:.1f} GB (single-frame" in captured.err
    assert "--cache-gb 20 (sized to hold the data); volume 100 GB (sized to hold the cache)" in captured.err
    assert request["HyperParameters"]["cache_gb"] == "20.0" and request["ResourceConfig"]["VolumeSizeInGB"] == 100
    assert launch.main(["--mode", "aws", "--role", ROLE, "--data-uri", dataset, "--output-uri",
                        f"s3://{bucket}/runs/", "--volume-size-gb", "40", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["HyperParameters"]["cache_gb"] == "10.0"
    assert "--cache-gb 10 (sized to hold the data); volume 40 GB (as you set it)" in captured.err


@pytest.mark.parametrize("instance_type, processes, count, expected", [
    ("ml.g5.12xlarge", 0, 2, "torchrun, 4 process(es) per host (one per GPU), 8 in all"),
    ("ml.p4d.24xlarge", 2, 1, "torchrun, 2 process(es) per host (--processes-per-host), 2 in all"),
    ("ml.m5.xlarge", 0, 3, "torchrun, 1 process(es) per host (a CPU instance), 3 in all"),
])
def test_the_dry_run_says_how_the_processes_are_laid_out(instance_type, processes, count, expected):
    spec = build_spec({"mode": "aws", "data_uri": "s3://d/x/", "output_uri": "s3://o/", "role": ROLE,
                       "instance_type": instance_type, "instance_count": count, "processes_per_host": processes,
                       "image_uri": "123456789012.dkr.ecr.us-east-1.amazonaws.com/brainseg-train:1"}, {})
    assert distribution_text(spec, instance_type) == expected
    text = image_text(spec.image_uri)
    assert text.endswith("(your image: torch as docker/build.sh installed it, pinned 2.13.0)")


def test_infra_launch_py_runs_from_any_folder(tmp_path):
    """The design card's command: `python infra/launch.py`, from the checkout or from elsewhere."""
    for cwd in (ROOT, tmp_path):
        result = subprocess.run([sys.executable, str(ROOT / "infra" / "launch.py"), "--help"], cwd=cwd,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: python infra/launch.py") and "iam-policy" in result.stdout
    refused = subprocess.run([sys.executable, "infra/launch.py", "--mode", "aws", "--data-uri", "s3://d/x/"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith("error: aws mode needs")


def test_a_dry_run_prints_no_sdk_chatter(offline):
    """What the SDK says on every call (the config files it did not find; "No region provided" from
    a client it builds itself) is not the user's business: stderr holds the launcher's lines only."""
    result = subprocess.run([sys.executable, "infra/launch.py", "--mode", "aws", "--role", ROLE, "--region",
                             "us-east-1", "--data-uri", "s3://scans/ds/", "--output-uri", "s3://runs/x/", "--dry-run"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "dry run: nothing was submitted" in result.stderr
    assert "Not applying SDK defaults" not in result.stderr and "No region provided" not in result.stderr, result.stderr


@pytest.mark.parametrize("processes, expected", [(0, None), (2, 2)])
def test_one_multi_gpu_instance_trains_under_torchrun(bucket, processes, expected):
    """ml.g5.12xlarge has four GPUs: one instance still gets SageMaker's torchrun driver, which starts
    one process per GPU (SM_NUM_GPUS) unless a count is given."""
    spec = build_spec({"mode": "aws", "data_uri": "s3://data-bucket/ds/", "output_uri": f"s3://{bucket}/runs/",
                       "role": ROLE, "image_uri": "123456789012.dkr.ecr.us-east-1.amazonaws.com/brainseg-train:1",
                       "instance_type": "ml.g5.12xlarge", "processes_per_host": processes}, {})
    session = boto3.Session(region_name="us-east-1")
    requests = _capture(session)
    job_name = sagemaker_job.submit(spec, session)
    assert requests[0]["ResourceConfig"]["InstanceCount"] == 1
    code_prefix = f"runs/brainseg/{job_name}/input/sm_drivers/"
    assert json.loads(s3.get_object(bucket, code_prefix + "distributed.json"))["process_count_per_node"] == expected
    script = s3.get_object(bucket, code_prefix + "sm_train.sh").decode()
    assert "distributed_drivers/torchrun_driver.py" in script and "basic_script_driver" not in script


def test_warm_pool_and_retries_reach_the_request(bucket):
    spec = build_spec({"mode": "aws", "data_uri": "s3://d/ds/", "output_uri": f"s3://{bucket}/runs/", "role": ROLE,
                       "keep_alive_s": 1800, "max_retries": 3}, {})
    request = sagemaker_job.dry_run_request(spec)
    assert request["ResourceConfig"]["KeepAlivePeriodInSeconds"] == 1800
    assert request["RetryStrategy"] == {"MaximumRetryAttempts": 3}


OFFLINE = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
           "AWS_CONFIG_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture
def offline(monkeypatch):
    """No credentials anywhere and every AWS endpoint a closed port."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_DEFAULT_REGION", "SAGEMAKER_VALIDATE_ROLE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)


def test_dry_run_works_offline_and_keeps_the_users_sagemaker_config(offline, tmp_path, monkeypatch, capsys):
    """No credentials, no network, no bucket: the request is still printed, with the user's own
    SageMaker defaults (tags, KMS key, subnets) applied where no flag says otherwise."""
    config = tmp_path / "sagemaker.yaml"
    config.write_text("SchemaVersion: '1.0'\nSageMaker:\n  TrainingJob:\n    Tags:\n      - Key: team\n"
                      "        Value: neuro\n      - Key: project\n        Value: theirs\n"
                      "    OutputDataConfig:\n      KmsKeyId: arn:aws:kms:us-east-1:123456789012:key/theirs\n"
                      "    VpcConfig:\n      Subnets: [subnet-a]\n      SecurityGroupIds: [sg-a]\n")
    monkeypatch.setenv("SAGEMAKER_USER_CONFIG_OVERRIDE", str(config))
    assert launch.main(["--mode", "aws", "--role", ROLE, "--data-uri", "s3://scans/ds/", "--output-uri",
                        "s3://no-such-bucket-anywhere/runs/", "--tag", "project=ours", "--dry-run"]) == 0
    request = json.loads(capsys.readouterr().out)
    assert request["OutputDataConfig"]["KmsKeyId"] == "arn:aws:kms:us-east-1:123456789012:key/theirs"
    assert {(t["Key"], t["Value"]) for t in request["Tags"]} == {("team", "neuro"), ("project", "ours")}
    assert request["VpcConfig"] == {"Subnets": ["subnet-a"], "SecurityGroupIds": ["sg-a"]}
    assert request["AlgorithmSpecification"]["TrainingImage"].startswith("763104351884.dkr.ecr.us-east-1.")
    assert sagemaker_job.sagemaker_config()["SageMaker"]["PythonSDK"]["Modules"]["TelemetryOptOut"] is True
    config.write_text(config.read_text() + "  PythonSDK:\n    Modules:\n      TelemetryOptOut: false\n")
    assert sagemaker_job.sagemaker_config()["SageMaker"]["PythonSDK"]["Modules"]["TelemetryOptOut"] is False


def test_a_real_submit_without_credentials_or_bucket_is_one_line(offline, monkeypatch, capsys, s3_server):
    argv = ["--mode", "aws", "--role", ROLE, "--region", "us-east-1", "--data-uri", "s3://scans/ds/",
            "--output-uri", "s3://no-such-bucket-anywhere/runs/"]
    assert launch.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no AWS credentials found") and err.count("\n") == 1, err
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    assert launch.main(argv) == 2
    err = capsys.readouterr().err
    assert err == "error: output bucket no-such-bucket-anywhere does not exist (create it, or pass another " \
                  "--output-uri)\n", err


def test_config_file_and_overrides(tmp_path, bucket, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(f"mode: aws\nrole: {ROLE}\ndata_uri: s3://d/ds/\noutput_uri: s3://{bucket}/runs/\n"
                      "instance_type: ml.p3.2xlarge\nhyperparameters:\n  epochs: 5\n  patch_size: [64, 64, 64]\n")
    assert launch.main(["--config", str(config), "--hp", "epochs=7", "--instance-count", "3", "--dry-run"]) == 0
    request = json.loads(capsys.readouterr().out)
    assert request["HyperParameters"]["epochs"] == "7" and request["HyperParameters"]["patch_size"] == "[64, 64, 64]"
    assert request["ResourceConfig"]["InstanceType"] == "ml.p3.2xlarge"
    assert request["ResourceConfig"]["InstanceCount"] == 3


@pytest.mark.parametrize("argv, message", [
    (["--mode", "aws", "--data-uri", "s3://d/x/", "--output-uri", "s3://o/"], "aws mode needs --role"),
    (["--mode", "aws", "--role", ROLE, "--data-uri", "s3://d/x/", "--output-uri", "s3://o/", "--hp",
      "learning_rate=0.1"], "unknown hyperparameter learning_rate"),
    (["--mode", "aws", "--role", ROLE, "--data-uri", "/data", "--output-uri", "s3://o/"],
     "expected an S3 URI like s3://bucket/prefix/, got '/data'"),
    (["--mode", "aws", "--role", ROLE, "--data-uri", "s3://d/x/", "--output-uri", "s3://o/", "--hp", "epochs=many"],
     "hyperparameter epochs='many'"),
    (["--mode", "aws", "--role", ROLE, "--data-uri", "s3://d/x/", "--output-uri", "s3://o/", "--spot",
      "--max-run-s", "7200", "--max-wait-s", "3600"], "max_wait_s 3600 is below max_run_s 7200"),
    (["--mode", "aws", "--role", ROLE, "--data-uri", "s3://d/x/", "--output-uri", "s3://o/", "--hp",
      "run_name=x"], "use --job-name"),
    (["--mode", "aws", "--role", ROLE, "--data-uri", "s3://d/x/", "--output-uri", "s3://o/",
      "--network-isolation"], "network_isolation cuts the container off from S3"),
    (["--mode", "process", "--dry-run"], "--dry-run prints a CreateTrainingJob request, so it needs --mode aws"),
    (["--mode", "aws", "--role", ROLE, "--data-uri", "s3://d/x/", "--output-uri", "s3://o/", "--hp",
      "patch_size=100,100,100"], "patch_size (100, 100, 100): with 5 levels (channels (16, 32, 64, 128, 256)) every "
                                 "size must be a multiple of 16; change patch_size or channels"),
    (["--mode", "aws", "--role", ROLE, "--data-uri", "s3://d/x/", "--output-uri", "s3://o/", "--hp",
      "learning_rate=0.01"], "unknown hyperparameter learning_rate; did you mean --lr?"),
    (["--mode", "aws", "--role", "brainseg-training", "--data-uri", "s3://d/x/", "--output-uri", "s3://o/"],
     "role 'brainseg-training': expected an IAM role ARN like arn:aws:iam::123456789012:role/brainseg"),
    (["--mode", "aws", "--role", ROLE, "--data-uri", "s3://d/x/", "--output-uri", "s3://o/", "--spot",
      "--keep-alive-s", "600"], "SageMaker has no warm pools for spot jobs"),
    (["--mode", "aws", "--role", ROLE, "--data-uri", "s3://d/x/", "--output-uri", "s3://o/",
      "--keep-alive-s", "7200"], "keep_alive_s 7200: expected 0 to 3600 seconds"),
    (["--mode", "aws", "--role", ROLE, "--data-uri", "s3://d/x/", "--output-uri", "s3://o/",
      "--max-retries", "31"], "max_retries 31: expected 0 to 30"),
])
def test_bad_input_is_refused_before_anything_is_submitted(argv, message, capsys):
    before = boto3.client("sagemaker", region_name="us-east-1").list_training_jobs()["TrainingJobSummaries"]
    assert launch.main(argv + ["--dry-run"] if "--role" in argv else argv) == 2
    assert message in capsys.readouterr().err
    after = boto3.client("sagemaker", region_name="us-east-1").list_training_jobs()["TrainingJobSummaries"]
    assert len(after) == len(before)


def test_local_mode_without_docker_or_image_says_so(bucket, capsys):
    code = launch.main(["--mode", "local", "--image-uri", "brainseg-missing:none", "--data-uri", "s3://d/x/",
                        "--output-uri", f"s3://{bucket}/runs/"])
    assert code == 2
    err = capsys.readouterr().err
    assert any(text in err for text in ("docker is not installed", "Docker is not running",
                                        "image brainseg-missing:none is not present locally")), err
    assert list(s3.list_objects(bucket, "")) == []


def _policies(capsys, *extra) -> dict:
    assert launch.main(["iam-policy", "--role", ROLE, "--data-uri", "s3://scans/brain/", "--output-uri",
                        "s3://results/runs/", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_iam_policy_prints_one_document_for_the_aws_cli(capsys):
    documents = _policies(capsys)
    for name in ("role_trust", "role_permissions", "caller_permissions"):
        assert _policies(capsys, "--document", name) == documents[name]
    assert documents["role_trust"]["Statement"][0]["Principal"] == {"Service": "sagemaker.amazonaws.com"}


def test_iam_policies_are_scoped_to_the_prefixes_and_the_account(capsys):
    documents = _policies(capsys, "--kms-key", "arn:aws:kms:eu-west-1:1:key/k", "--vpc", "--region", "eu-west-1",
                          "--mlflow-server", MLFLOW)
    by_sid = {statement["Sid"]: statement for statement in documents["role_permissions"]["Statement"]}
    assert by_sid["LogToMlflow"] == {"Sid": "LogToMlflow", "Effect": "Allow", "Action": "sagemaker-mlflow:*",
                                     "Resource": [MLFLOW]}
    assert by_sid["ReadDataset"]["Resource"] == "arn:aws:s3:::scans/brain/*"
    assert by_sid["ReadDataset"]["Action"] == "s3:GetObject"
    assert by_sid["ReadDataset"]["Condition"] == {"StringEquals": {"s3:ResourceAccount": "123456789012"}}
    assert by_sid["ReadWriteHeaderIndex"]["Resource"] == ["arn:aws:s3:::scans/brain/.brainseg/*"]
    assert by_sid["ReadWriteOutput"]["Resource"] == "arn:aws:s3:::results/runs/*"
    assert "s3:DeleteObject" not in by_sid["ReadWriteOutput"]["Action"]
    assert by_sid["PruneCheckpoints"]["Resource"] == "arn:aws:s3:::results/runs/brainseg*/checkpoints/*"
    assert by_sid["ListDataset"]["Condition"]["StringLike"]["s3:prefix"] == ["brain/*"]
    assert by_sid["UseKmsKeysThroughS3AndVolumes"]["Condition"] == {
        "StringLike": {"kms:ViaService": ["s3.eu-west-1.amazonaws.com", "ec2.eu-west-1.amazonaws.com"]}}
    assert by_sid["GrantKmsToVolumes"]["Condition"] == {"Bool": {"kms:GrantIsForAWSResource": "true"}}
    assert "VpcNetworkInterfaces" in by_sid
    assert not any(statement["Resource"] == "arn:aws:s3:::*" for statement in documents["role_permissions"]["Statement"])
    trust = documents["role_trust"]["Statement"][0]
    assert trust["Principal"] == {"Service": "sagemaker.amazonaws.com"}
    assert trust["Condition"]["ArnLike"]["aws:SourceArn"] == "arn:aws:sagemaker:eu-west-1:123456789012:training-job/*"
    caller = {statement["Sid"]: statement for statement in documents["caller_permissions"]["Statement"]}
    assert caller["RunTuningJobs"]["Resource"] == \
        "arn:aws:sagemaker:eu-west-1:123456789012:hyper-parameter-tuning-job/brainseg*"
    assert "sagemaker:StopTrainingJob" in caller["RunTrainingJobs"]["Action"]
    assert caller["PassTheJobRoleToSageMakerOnly"]["Resource"] == ROLE
    assert caller["PassTheJobRoleToSageMakerOnly"]["Condition"]["StringEquals"]["iam:PassedToService"] == \
        "sagemaker.amazonaws.com"
    assert caller["RunTrainingJobs"]["Resource"] == "arn:aws:sagemaker:eu-west-1:123456789012:training-job/brainseg*"


@pytest.mark.parametrize("flag, value, message", [
    ("--output-uri", "s3://scans/brain/runs/", "overlap: the output's write and delete grant would reach the data"),
    ("--output-uri", "s3://scans/", "overlap"),
    ("--role", "brainseg-role", "expected an IAM role ARN"),
])
def test_iam_policy_refuses_what_would_hurt_the_data(capsys, flag, value, message):
    argv = ["iam-policy", "--role", ROLE, "--data-uri", "s3://scans/brain/", "--output-uri", "s3://results/runs/"]
    argv[argv.index(flag) + 1] = value
    assert launch.main(argv) == 2 and message in capsys.readouterr().err


def test_a_job_makes_only_calls_its_printed_policy_allows(dataset, bucket):
    output, index, key = f"s3://{bucket}/runs", f"s3://{bucket}/indexes/launch.jsonl", f"s3://{bucket}/keys/brain.key"
    policy = launch.policies(launch._parser().parse_args(
        ["iam-policy", "--role", ROLE, "--data-uri", dataset, "--output-uri", output, "--index-uri", index,
         "--identity-key-uri", key]))["role_permissions"]
    args = ["--data-uri", dataset, "--output-uri", output, "--index-uri", index, "--identity-key-uri", key,
            "--run-name", "brainseg-iam",
            "--channels", "8,16", "--patch-size", "16,32,32", "--res-units", "1", "--epochs", "1", "--steps-per-epoch",
            "3", "--checkpoint-steps", "1", "--keep-checkpoints", "1", "--num-workers", "0", "--max-val-cases", "1"]
    with S3Calls(s3.client()) as recorded:
        assert train.main(args) == 0
    operations = {operation for operation, _ in recorded.calls}
    assert {"ListObjectsV2", "GetObject", "PutObject", "DeleteObject"} <= operations and "HeadBucket" not in operations
    refused = [(operation, params.get("Key", params.get("Prefix"))) for operation, params in recorded.calls
               if not allowed(policy, *request(operation, params, "123456789012"))]
    assert refused == []
    # The evaluator is not lenient: what the printed policy must refuse, it refuses.
    assert not allowed(policy, *request("HeadBucket", {"Bucket": dataset.split("/")[2]}, "123456789012"))
    assert not allowed(policy, *request("GetObject", {"Bucket": dataset.split("/")[2], "Key": "ds/x.dcm"},
                                        "999999999999"))
    assert not allowed(policy, *request("DeleteObject", {"Bucket": bucket, "Key": "runs/brainseg-iam/run.json"},
                                        "123456789012"))
    assert s3.read_uri(key) is not None and s3.read_uri(index + ".key") is None  # the key lives apart
    assert not allowed(policy, *request("GetObject", {"Bucket": bucket, "Key": "indexes/launch.jsonl.key"},
                                        "123456789012"))


def test_a_prediction_job_makes_only_calls_its_printed_policy_allows(process_run, dataset, bucket):
    output = f"s3://{bucket}/predicted/"
    model = f"{process_run['output']}/proc-1/"
    policy = launch.policies(launch._parser().parse_args(
        ["iam-policy", "--role", ROLE, "--data-uri", dataset, "--output-uri", output, "--model", model]))["role_permissions"]
    with S3Calls(s3.client()) as recorded:
        assert predict.main(["--model", model, "--data-uri", dataset, "--output-uri", output, "--cases", "case_0000"]) == 0
    operations = {operation for operation, _ in recorded.calls}
    assert {"ListObjectsV2", "GetObject", "PutObject", "DeleteObject"} <= operations
    refused = [(operation, params.get("Key", params.get("Prefix"))) for operation, params in recorded.calls
               if not allowed(policy, *request(operation, params, "123456789012"))]
    assert refused == []
    assert not allowed(policy, *request("DeleteObject", {"Bucket": bucket, "Key": "predicted/case_0000/volumes.csv"},
                                        "123456789012"))
    model_bucket, model_prefix = s3.parse_uri(model)
    assert not allowed(policy, *request("GetObject", {"Bucket": model_bucket, "Key": f"{model_prefix}checkpoints/x.pt"},
                                        "123456789012"))


def test_help_describes_every_launcher_flag():
    parser = launch._parser()
    [commands] = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    assert set(commands.choices) == set(launch.COMMANDS)
    for name, subparser in commands.choices.items():
        for action in subparser._actions:
            assert action.help and len(action.help) > 10, (name, action.dest)


def test_predict_in_process_mode_splits_the_cases_between_hosts(process_run, dataset, bucket, capsys):
    output = f"s3://{bucket}/predictions/"
    code = launch.main(["predict", "--mode", "process", "--instance-count", "2", "--model",
                        f"{process_run['output']}/proc-1/", "--data-uri", dataset, "--output-uri", output,
                        "--hp", "sw_batch_size=4"])
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    assert f"predictions: {output}" in printed and "8 predicted" in printed
    shards = {k: s3.read_uri(f"{output}shards/{k}-of-2.csv").decode().splitlines()[1:] for k in (0, 1)}
    assert len(shards[0]) == len(shards[1]) == 4  # algo-1 and algo-2 took four cases each
    assert "algo-1 | " in printed and "algo-2 | " in printed
    assert json.loads(s3.read_uri(output + "complete.json"))["predicted"] == 8


def test_a_predict_job_request_runs_predict_py_with_its_options(bucket, capsys):
    code = launch.main(["predict", "--mode", "aws", "--role", ROLE, "--model", "s3://m/runs/a/", "--model",
                        "s3://m/runs/b/model.tar.gz", "--data-uri", "s3://d/new/", "--output-uri",
                        f"s3://{bucket}/pred/", "--instance-count", "3", "--hp", "mirror=true", "--dry-run"])
    assert code == 0
    request = json.loads(capsys.readouterr().out)
    assert request["HyperParameters"] == {"mirror": "true", "model": "s3://m/runs/a/,s3://m/runs/b/model.tar.gz",
                                          "data_uri": "s3://d/new/", "output_uri": f"s3://{bucket}/pred/"}
    assert request["ResourceConfig"]["InstanceCount"] == 3 and "CheckpointConfig" not in request
    spec = build_spec({"mode": "aws", "script": "predict.py", "role": ROLE, "data_uri": "s3://d/new/",
                       "output_uri": f"s3://{bucket}/pred/", "instance_count": 3}, {"model": "s3://m/runs/a/"})
    trainer = sagemaker_job.build_trainer(spec, boto3.Session(region_name="us-east-1"))
    assert trainer.source_code.entry_script == "predict.py" and trainer.distributed is None  # no torchrun


@pytest.mark.parametrize("argv, message", [
    (["--hp", "mirorr=true"], "unknown predict option mirorr; did you mean mirror?"),
    (["--hp", "shard=3/2"], "shard '3/2'"),
    (["--hp", "data_uri=s3://x/"], "use --data-uri"),
])
def test_bad_predict_options_are_refused_before_anything_is_submitted(argv, message, bucket, capsys):
    base = ["predict", "--mode", "aws", "--role", ROLE, "--model", "s3://m/r/", "--data-uri", "s3://d/new/",
            "--output-uri", f"s3://{bucket}/pred/", "--dry-run"]
    assert launch.main(base + argv) == 2
    assert message in capsys.readouterr().err


def test_the_demos_overrides_are_checked_on_top_of_its_own_settings():
    spec = launch.spec_from_args(launch._parser().parse_args(["train", "--hp", "sequence_dropout=0.5"]))
    assert spec.hyperparameters["sequence_dropout"] == 0.5  # needs the demo's four sequences, not the default one
    assert spec.hyperparameters["sequences"] == "t1c,t1,t2,flair"
    with pytest.raises(ValueError, match="sequence_dropout 0.5 with sequences 'image'"):
        launch.spec_from_args(launch._parser().parse_args(["train", "--hp", "sequence_dropout=0.5", "--hp",
                                                           "sequences=image"]))
