"""Training benchmark: step time and data wait with streamed vs in-memory data, and the accuracy target.

    python benchmarks/train_step.py [--cases 40] [--shape 48,96,96] [--latency-ms 20]
                                    [--epochs 10] [--steps 40] [--out benchmarks/results/train_step.json]

One embedded S3 (moto, its own process, ``--latency-ms`` added to every request) holds a synthetic
dataset. ``entry_point/train.py`` runs twice on it with the same hyperparameters, once with
``--data-source stream`` (patches by ranged GETs while training) and once with ``memory`` (every
training volume downloaded first). Figures come from the runs' own ``metrics.jsonl`` and
``summary.json``: step time and data-wait fraction per epoch (epoch 1 includes the pipeline
start), wall time and test Dice. Acceptance: test Dice >= 0.85 within 15 minutes of CPU training,
streamed Dice within 0.02 of in-memory Dice.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from brainseg.io import s3  # noqa: E402
from infra.data.synth import SynthSpec, write_dataset  # noqa: E402
from infra.s3server import EmbeddedS3  # noqa: E402

BUCKET = "bench-train"
MODEL = ["--channels", "8,16,32,64", "--patch-size", "32,64,64", "--res-units", "2", "--batch-size", "2",
         "--lr", "3e-3", "--warmup-steps", "20", "--foreground-fraction", "0.5", "--num-workers", "2",
         "--log-every", "1000"]
TARGET_DICE, TARGET_GAP, TARGET_SECONDS = 0.85, 0.02, 15 * 60


def run(source: str, dataset: str, epochs: int, steps: int) -> dict:
    output = f"s3://{BUCKET}/runs"
    command = [sys.executable, str(ROOT / "entry_point" / "train.py"), "--data-uri", dataset, "--output-uri",
               output, "--run-name", source, "--data-source", source, "--epochs", str(epochs),
               "--steps-per-epoch", str(steps), *MODEL]
    with tempfile.TemporaryDirectory() as model_dir:
        started = time.perf_counter()
        child = subprocess.run(command, capture_output=True, text=True,
                               env=dict(os.environ, SM_MODEL_DIR=model_dir))
        wall = time.perf_counter() - started
    if child.returncode != 0:
        raise RuntimeError(f"{source} run failed:\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}")
    lines = [json.loads(line) for line in s3.read_uri(f"{output}/{source}/metrics/metrics.jsonl").splitlines()]
    summary = json.loads(s3.read_uri(f"{output}/{source}/summary.json"))
    later = lines[1:] or lines
    return {
        "data_source": source,
        "wall_seconds": round(wall, 1),
        "train_seconds": round(sum(line["seconds"] for line in lines), 1),
        "val_seconds": round(sum(line["val_seconds"] for line in lines), 1),
        "step_seconds_epoch1": round(lines[0]["seconds"] / steps, 4),
        "step_seconds": round(sum(line["seconds"] for line in later) / (steps * len(later)), 4),
        "data_wait_fraction_epoch1": round(lines[0]["data_wait_fraction"], 4),
        "data_wait_fraction": round(sum(line["data_wait_fraction"] for line in later) / len(later), 4),
        "patches_per_s": round(sum(line["patches_per_s"] for line in later) / len(later), 2),
        "best_epoch": summary["best_epoch"],
        "best_val_dice": round(summary["best_val_dice"], 4),
        "test_dice_mean": round(summary["test_dice_mean"], 4),
        "test_dice_median": round(summary["test_dice_median"], 4),
        "test_cases": summary["test_cases"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--shape", default="48,96,96", help="D,H,W of each synthetic volume")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40, help="steps per epoch")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_step.json")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    with EmbeddedS3(latency_ms=args.latency_ms) as server:
        os.environ.update(server.environment())
        s3.reset_client()
        s3.client().create_bucket(Bucket=BUCKET)
        dataset = f"s3://{BUCKET}/ds/"
        write_dataset(args.cases, dataset, SynthSpec(shape=shape), jobs=2)
        rows = []
        for source in ("stream", "memory"):
            rows.append(run(source, dataset, args.epochs, args.steps))
            print(json.dumps(rows[-1]), flush=True)
    streamed, in_memory = rows
    gap = abs(streamed["test_dice_mean"] - in_memory["test_dice_mean"])
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "setup": {"cases": args.cases, "shape": shape, "latency_ms": args.latency_ms, "epochs": args.epochs,
                  "steps_per_epoch": args.steps, "hyperparameters": MODEL},
        "runs": rows,
        "acceptance": {
            "test_dice_streamed": streamed["test_dice_mean"], "target_dice": TARGET_DICE,
            "streamed_train_and_eval_seconds": streamed["train_seconds"] + streamed["val_seconds"],
            "target_seconds": TARGET_SECONDS, "dice_gap_stream_vs_memory": round(gap, 4), "target_gap": TARGET_GAP,
            "met": streamed["test_dice_mean"] >= TARGET_DICE and gap <= TARGET_GAP
            and streamed["wall_seconds"] <= TARGET_SECONDS,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["acceptance"], indent=1))
    print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
