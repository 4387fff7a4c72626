"""SageMaker local mode for real: the SDK runs the training image with docker-compose against the
embedded S3. Needs a Docker engine and the image; `make test-local-mode` (run by .ci/run) starts
the engine, builds both images offline and runs this. Without them the test is skipped, saying why."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import console_script

ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("BRAINSEG_TEST_IMAGE", "brainseg-train:latest")
pytestmark = [pytest.mark.slow, pytest.mark.docker]


def _docker_problem() -> str | None:
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "docker is not installed"
    if info.returncode != 0:
        return "the Docker engine is not running"
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode != 0:
        return f"image {IMAGE} is not built (bash docker/build.sh {IMAGE})"
    return None


def _local_containers() -> set[str]:
    listing = subprocess.run(["docker", "ps", "-aq", "--filter", "name=brainseg-local-"], capture_output=True, text=True)
    return set(listing.stdout.split())


def test_local_mode_job_reads_the_embedded_s3_and_writes_artifacts(tmp_path):
    problem = _docker_problem()
    if problem:
        pytest.skip(f"local mode: {problem}")
    before = _local_containers()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SM_"))}
    env["AWS_DEFAULT_REGION"] = "us-east-1"
    result = subprocess.run(
        [console_script("brainseg-launch"), "--mode", "local", "--image-uri", IMAGE,
         "--hp", "epochs=1", "--hp", "steps_per_epoch=4", "--hp", "num_workers=0", "--hp", "max_val_cases=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-5000:]
    assert "running as brainseg, not root" in out  # the image drops root before reading data
    assert "under torchrun: 1 process(es) on this host, 1 in all" in out  # SageMaker's torchrun driver, no GPU
    run_dirs = list((tmp_path / "demo-output").iterdir())
    assert len(run_dirs) == 1 and run_dirs[0].name.startswith("brainseg-")
    run = run_dirs[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_cases"] == 7 and 0 <= summary["test_dice_mean"] <= 1
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert len((run / "metrics" / "metrics.jsonl").read_text().splitlines()) == 1
    assert (run / "model" / "model.pt").stat().st_size > 0
    assert f"artifacts: s3://brainseg-demo/runs/{run.name}/" in out
    assert _local_containers() == before, "local mode left containers behind"


def test_local_mode_prediction_job_writes_seg_through_the_image(tmp_path):
    """predict.py in the training image (highdicom installed there), against an S3 on this machine
    that the launcher points the container at."""
    problem = _docker_problem()
    if problem:
        pytest.skip(f"local mode: {problem}")
    from dataclasses import asdict

    from brainseg.io import s3
    from brainseg.model.artifact import artifact_bytes
    from brainseg.model.description import ModelDescription
    from brainseg.model.networks import NetworkSpec, build_model
    from infra.data.synth import SynthSpec, write_dataset
    from infra.s3server import EmbeddedS3

    with EmbeddedS3(host="0.0.0.0") as server:
        saved = {name: os.environ.get(name) for name in server.environment()}
        os.environ.update(server.environment())
        s3.reset_client()
        try:
            s3.client().create_bucket(Bucket="local-predict")
            write_dataset(2, "s3://local-predict/data/", SynthSpec(shape=(16, 32, 32)))
            network = NetworkSpec(channels=(8, 16), res_units=1)
            description = ModelDescription(network=asdict(network), task="segmentation", sequences=("image",),
                                           labels="tumour=*", regions="", target_spacing=(), normalization="zscore",
                                           patch_size=(16, 32, 32), sw_overlap=0.25)
            s3.put_bytes("s3://local-predict/model/model.pt", artifact_bytes(description, build_model(network).state_dict()))
            env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
            env["AWS_DEFAULT_REGION"] = "us-east-1"
            result = subprocess.run(
                [console_script("brainseg-launch"), "predict", "--mode", "local", "--image-uri", IMAGE, "--model",
                 "s3://local-predict/model/model.pt", "--data-uri", "s3://local-predict/data/", "--output-uri",
                 "s3://local-predict/out/"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
            out = result.stdout + result.stderr
            assert result.returncode == 0, out[-5000:]
            assert "running as brainseg, not root" in out and "2 predicted" in out
            assert json.loads(s3.read_uri("s3://local-predict/out/complete.json"))["predicted"] == 2
            assert s3.read_uri("s3://local-predict/out/case_0001/segmentation.dcm")[128:132] == b"DICM"
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            s3.reset_client()
