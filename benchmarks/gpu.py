"""One command to measure a GPU: the training job on BraTS-shaped studies streamed from S3, in bf16,
with ``torch.compile`` off and on.

    python benchmarks/gpu.py [--cases 6] [--steps 40] [--out benchmarks/results/gpu.json]
    # this repository's CPU check (the defaults are a GPU's work; on 2 cores, ~3 min):
    python benchmarks/gpu.py --cases 3 --shape 48,96,96 --patch 32,64,64 --channels 8,16,32 --steps 4 \\
        --workers 1 --out benchmarks/reference/gpu-cpu-<date>.json

``--cases`` four-sequence studies (t1c, t1, t2, flair and a BraTS label series; single-frame,
``--shape`` voxels at 1 mm) are written into the embedded S3 (moto in its own process,
``--latency-ms`` added to every request), and ``entry_point/train.py`` (the job itself, in a
process of its own) trains on them twice, ``--compile false`` then ``true``: BraTS regions,
``--patch`` patches, batch 2, bf16, the default network unless ``--channels``, ``--workers``
DataLoader workers, 2 epochs of ``--steps`` steps, each run with a new host cache (epoch 1 reads
cold: the header index and the case summaries are made before, so neither run's catalog step
reads a volume into its cache; epoch 2 partly warm). Validation covers one case, so that an
epoch is mostly training.

From each run's own epoch lines: patches/s and data-wait fraction (epoch 2: epoch 1 holds the
pipeline's start and compilation), GETs per patch cold (epoch 1) and warm (epoch 2), the GPU's
peak memory (``gpu_memory_gib``: CUDA only, beside ``--plan auto``'s estimate for the same network,
patch and batch); from the benchmark: the job's CPU-seconds per patch
(the trainer and its workers together), its wall time; and the cost of 1,000 steps on
ml.g5.xlarge (one A10G) and ml.p4d.24xlarge (eight A100s) at the list prices in
``brainseg.bill.INSTANCES``, as if each of the instance's GPUs ran at the patches/s measured here
(the figure means something only where this machine's GPU is the instance's), plus the GET fees
at the warm rate. On a machine without a GPU it runs the same way on the CPU (bf16 autocast
there): a check that the command works end to end, not a GPU figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from brainseg.bill import INSTANCES  # noqa: E402
from brainseg.data.catalog import build_catalog  # noqa: E402
from brainseg.io import s3  # noqa: E402
from brainseg.labels import parse_scheme  # noqa: E402
from brainseg.model.networks import NetworkSpec  # noqa: E402
from brainseg.run.plan import estimate_gb  # noqa: E402
from infra.data.synth import SynthSpec, write_dataset  # noqa: E402
from infra.s3server import EmbeddedS3  # noqa: E402

SEQUENCES = ("t1c", "t1", "t2", "flair")
LABELS = "ncr=1,ed=2,et=4"
BUCKET = "bench-gpu"
PRICED = ("ml.g5.xlarge", "ml.p4d.24xlarge")
GET_USD_PER_1000 = 0.0004  # S3 Standard GET, us-east-1 list price (the job's --get-price-per-1000 default)
BATCH = 2


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def train(data: str, compile_: bool, args) -> dict:
    """One run of the job; its epoch lines and what it cost this machine."""
    name = f"compile-{str(compile_).lower()}"
    output = f"s3://{BUCKET}/runs"
    flags = ["--data-uri", data, "--output-uri", output, "--run-name", name, "--sequences", ",".join(SEQUENCES),
             "--labels", LABELS, "--regions", "brats", "--patch-size", args.patch, "--batch-size",
             str(BATCH), "--precision", "bf16", "--compile", str(compile_).lower(), "--epochs", "2",
             "--steps-per-epoch", str(args.steps), "--num-workers", str(args.workers), "--max-val-cases", "1",
             "--warmup-steps", "0", "--log-every", "1000"]
    if args.channels:
        flags += ["--channels", args.channels]
    with tempfile.TemporaryDirectory() as model_dir, tempfile.TemporaryDirectory() as cache_dir:
        cpu, started = _children_cpu_seconds(), time.perf_counter()
        child = subprocess.run([sys.executable, str(ROOT / "entry_point" / "train.py"), *flags, "--cache-dir",
                                cache_dir], capture_output=True, text=True, env=dict(os.environ, SM_MODEL_DIR=model_dir))
        wall, cpu = time.perf_counter() - started, _children_cpu_seconds() - cpu
    if child.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}")
    cold, warm = [json.loads(line) for line in s3.read_uri(f"{output}/{name}/metrics/metrics.jsonl").splitlines()]
    patches = 2 * args.steps * BATCH
    figures = {
        "compile": compile_,
        "patches_per_s": round(warm["patches_per_s"], 3),
        "patches_per_s_epoch1": round(cold["patches_per_s"], 3),
        "data_wait_fraction": round(warm["data_wait_fraction"], 3),
        "data_wait_fraction_epoch1": round(cold["data_wait_fraction"], 3),
        "gets_per_patch_cold": round(cold["gets_per_patch"], 2),
        "gets_per_patch_warm": round(warm["gets_per_patch"], 2),
        "gpu_memory_gib": warm.get("gpu_memory_gib"),
        "job_cpu_seconds_per_patch": round(cpu / patches, 3),
        "job_wall_seconds": round(wall, 1),
        "train_seconds": round(cold["seconds"] + warm["seconds"], 1),
        "val_seconds": round(cold["val_seconds"] + warm["val_seconds"], 1),
    }
    figures["per_1000_steps"] = per_1000_steps(figures["patches_per_s"], figures["gets_per_patch_warm"])
    return figures


def per_1000_steps(patches_per_s: float, gets_per_patch: float) -> dict:
    """Hours and dollars of 1,000 steps (batch 2 per GPU) on each priced instance at this rate per GPU."""
    out = {}
    for instance in PRICED:
        gpu, gpus, usd_per_hour = INSTANCES[instance]
        hours = 1000 * BATCH / patches_per_s / 3600  # each GPU takes its own 1,000 steps at the same pace
        patches = 1000 * BATCH * gpus
        out[instance] = {"gpus": f"{gpus} x {gpu}", "hours": round(hours, 4),
                         "instance_usd": round(hours * usd_per_hour, 4),
                         "get_usd": round(patches * gets_per_patch * GET_USD_PER_1000 / 1000, 4)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--shape", default="155,240,240", help="D,H,W of each study (1 mm voxels)")
    parser.add_argument("--patch", default="128,128,128")
    parser.add_argument("--channels", default="", help="the network's channels (default: the job's default network)")
    parser.add_argument("--steps", type=int, default=40, help="steps per epoch (two epochs)")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="added to every S3 request")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu.json")
    args = parser.parse_args(argv)
    shape = tuple(int(value) for value in args.shape.split(","))
    patch = tuple(int(value) for value in args.patch.split(","))
    spec = NetworkSpec(in_channels=len(SEQUENCES), out_channels=3)  # the job's default network, BraTS regions
    if args.channels:
        spec = dataclasses.replace(spec, channels=tuple(int(value) for value in args.channels.split(",")))
    cuda = torch.cuda.is_available()
    report = {"device": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores, no GPU)",
              "gpu": cuda, "torch": torch.__version__, "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "cases": args.cases, "shape": shape, "patch": args.patch,
              "channels": args.channels or "default", "batch_size": BATCH, "precision": "bf16",
              "steps_per_epoch": args.steps, "epochs": 2, "workers": args.workers, "latency_ms": args.latency_ms,
              "plan_estimate_gb": round(estimate_gb(spec, patch, BATCH, "bf16"), 2), "runs": []}
    with EmbeddedS3(latency_ms=args.latency_ms) as server:
        os.environ.update(server.environment())
        s3.reset_client()
        s3.create_bucket(BUCKET)
        data = f"s3://{BUCKET}/brats/"
        started = time.perf_counter()
        write_dataset(args.cases, data, SynthSpec(shape=shape, spacing=(1.0, 1.0, 1.0), sequences=SEQUENCES), jobs=2)
        report["write_seconds"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        build_catalog(data, sequences=SEQUENCES, labels=parse_scheme(LABELS, "brats"))  # the index both runs reuse
        report["index_seconds"] = round(time.perf_counter() - started, 1)
        for compile_ in (False, True):
            figures = train(data, compile_, args)
            report["runs"].append(figures)
            memory = f"{figures['gpu_memory_gib']:.2f} GiB" if figures["gpu_memory_gib"] is not None else "n/a (CPU)"
            memory += f" (--plan auto estimates {report['plan_estimate_gb']:.2f} GB)"
            print(f"compile {str(compile_).lower():5s}: {figures['patches_per_s']:.2f} patches/s (epoch 1 "
                  f"{figures['patches_per_s_epoch1']:.2f}), data wait {figures['data_wait_fraction']:.1%}, "
                  f"GPU memory peak {memory}, job CPU {figures['job_cpu_seconds_per_patch']:.2f} s/patch, "
                  f"GETs/patch cold {figures['gets_per_patch_cold']:.1f} warm {figures['gets_per_patch_warm']:.1f}",
                  flush=True)
            for instance, cost in figures["per_1000_steps"].items():
                print(f"    1,000 steps on {instance} ({cost['gpus']}): {cost['hours']:.3f} h, "
                      f"${cost['instance_usd']:.2f} instance, ${cost['get_usd']:.4f} GETs", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
