"""Two processes under torchrun with the gloo backend on CPU (the slow tier: `make test-slow`)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from brainseg.io import s3
from brainseg.run import distributed
from infra.data.synth import SynthSpec, write_dataset
from infra.launcher import process_job
from infra.launcher.jobspec import build_spec
from tests.conftest import console_script

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_two_process_ddp_run(bucket, tmp_path):
    dataset = f"s3://{bucket}/ds/"
    write_dataset(8, dataset, SynthSpec(shape=(32, 64, 64)))
    output = f"s3://{bucket}/runs"
    env = dict(os.environ, SM_MODEL_DIR=str(tmp_path / "model"))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
               str(ROOT / "entry_point" / "train.py"), "--data-uri", dataset, "--output-uri", output,
               "--run-name", "ddp", "--channels", "8,16,32", "--patch-size", "32,32,32", "--res-units", "1",
               "--epochs", "2", "--steps-per-epoch", "4", "--num-workers", "1", "--batch-size", "2"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out

    run = json.loads(s3.read_uri(f"{output}/ddp/run.json"))
    assert run["status"] == "finished" and run["world_size"] == 2
    lines = [json.loads(line) for line in s3.read_uri(f"{output}/ddp/metrics/metrics.jsonl").splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]  # rank 0 alone writes: no duplicates
    assert out.count("epoch_metrics epoch=2 ") == 1 and out.count("test_metrics test_dice=") == 1

    pointer = json.loads(s3.read_uri(f"{output}/ddp/checkpoints/latest.json"))
    checkpoint = torch.load(io.BytesIO(s3.read_uri(f"{output}/ddp/checkpoints/{pointer['checkpoint']}")),
                            weights_only=True)
    assert checkpoint["sampler"]["world_size"] == 2 and len(checkpoint["rng"]) == 2
    assert checkpoint["state"]["step"] == 8  # steps count per rank: 2 x 4, each of 2 ranks' batches
    assert all(torch.isfinite(tensor).all() for tensor in checkpoint["model"].values() if tensor.is_floating_point())


def test_process_mode_two_instances_under_torchrun(bucket, tmp_path):
    """Two simulated hosts, each a torchrun agent with SageMaker's node rank and master address."""
    dataset = f"s3://{bucket}/ds2/"
    write_dataset(8, dataset, SynthSpec(shape=(32, 64, 64)))
    result = subprocess.run(
        [console_script("brainseg-launch"), "--mode", "process", "--instance-count", "2",
         "--data-uri", dataset, "--output-uri", f"s3://{bucket}/runs/", "--job-name", "two-hosts",
         "--hp", "channels=[8,16,32]", "--hp", "patch_size=[32,32,32]", "--hp", "res_units=1", "--hp", "epochs=1",
         "--hp", "steps_per_epoch=3", "--hp", "num_workers=0"],
        cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "algo-1 | " in out  # algo-2's rank logs warnings only
    assert not Path(out.split("container directories under ")[1].split()[0]).exists()  # removed at the end
    spec = build_spec({"mode": "process", "instance_count": 2, "data_uri": dataset, "output_uri": f"s3://{bucket}/r/"},
                      {})
    for rank, host in enumerate(("algo-1", "algo-2")):
        process_job.host_environment(spec, "two-hosts-1", tmp_path, rank, 29400)
        config = json.loads((tmp_path / host / "opt/ml/input/config/resourceconfig.json").read_text())
        assert config == {"current_host": host, "hosts": ["algo-1", "algo-2"]}
    job = out.split("artifacts: ")[1].split()[0]
    run = json.loads(s3.read_uri(job + "run.json"))
    assert run["world_size"] == 2 and run["status"] == "finished" and run["run_name"].startswith("two-hosts-")


def test_the_readme_demo_command(tmp_path):
    """`python infra/launch.py` with no arguments (what `make demo` runs): embedded S3, synthetic
    four-sequence studies, a short run that learns the three regions (chance is about 0.01;
    measured: whole tumour 0.95, mean 0.52), and its report in demo-output/."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SM_"))}
    result = subprocess.run([sys.executable, str(ROOT / "infra" / "launch.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    [run] = list((tmp_path / "demo-output").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["structures"] == ["wt", "tc", "et"], summary
    assert min(summary[f"test_dice_{name}"] for name in ("wt", "tc", "et")) > 0.7, summary  # every region
    assert 0 < summary["lesion_wise"]["et"]["dice"] <= 1 and summary["lesion_wise"]["et"]["lesions"] > 0, summary
    page = run / "report" / "index.html"
    assert f"report: open {page.resolve()} in a browser" in result.stdout
    figures = re.findall(r'<img src="([^"]+)"', page.read_text())
    assert "structure_curves.png" in figures and f"volumes_{run.name}.png" in figures
    assert len([figure for figure in figures if figure.startswith("overlay_")]) >= 2
    assert all((run / "report" / figure).stat().st_size > 10_000 for figure in figures)


@pytest.mark.parametrize("cores, local, threads", [(2, 1, 2), (16, 1, 16), (16, 4, 4), (3, 4, 1)])
def test_cpu_training_takes_its_share_of_the_cores(monkeypatch, cores, local, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    assert distributed.cpu_threads() == threads


def test_cpu_training_sets_its_threads_and_starts_them(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    before = torch.get_num_threads()
    try:
        assert distributed.use_cpu_threads() == distributed.cpu_threads() == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
