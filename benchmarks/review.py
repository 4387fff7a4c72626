"""Review benchmark: listing runs, following a growing metrics.jsonl, and writing the HTML report.

    python benchmarks/review.py [--runs 8] [--epochs 500] [--cases 50] [--latency-ms 20]
                                [--out benchmarks/results/review.json]

One embedded S3 (moto, its own process, ``--latency-ms`` added to every request) holds ``--runs``
finished runs written through ``brainseg.layout.Store`` as the training job writes them
(run.json, an ``--epochs``-line metrics.jsonl, summary, per-case CSV of ``--cases`` rows, one
32×64×64 prediction crop per case). Measured: listing and reading every run under the prefix;
following one run while it grows an epoch at a time, incremental polls (``MetricsTail``) against
reading the whole file each time; and the report (figures, overlays, HTML) for all runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from brainseg.io import s3  # noqa: E402
from brainseg.io.store import Store  # noqa: E402
from brainseg.layout import RunLayout  # noqa: E402
from infra.review.report import write_report  # noqa: E402
from infra.review.runs import MetricsTail, list_runs  # noqa: E402
from infra.s3server import EmbeddedS3  # noqa: E402

BUCKET = "bench-review"
CROP = (32, 64, 64)


def epoch_line(epoch: int, rng: np.random.Generator) -> dict:
    return {"epoch": epoch, "step": 250 * epoch, "train_loss": float(1 / epoch + rng.random() * 0.01),
            "val_dice": float(1 - 1 / (epoch + 1)), "val_iou": float(1 - 1.5 / (epoch + 2)), "lr": 1e-3,
            "patches_per_s": float(20 + rng.random()), "data_wait_fraction": float(rng.random() * 0.05),
            "seconds": 60.0, "val_seconds": 12.0}


def crop(rng: np.random.Generator) -> dict:
    """A crop like the training job's: float16 image, uint8 mask and prediction, origin, spacing."""
    z, y, x = np.ogrid[:CROP[0], :CROP[1], :CROP[2]]
    tumour = ((z - 16) ** 2 / 64 + (y - 32) ** 2 / 256 + (x - 32) ** 2 / 256) < 1
    image = (rng.normal(size=CROP) + 2 * tumour).astype(np.float16)
    prediction = np.roll(tumour, 2, axis=2)
    return {"image": image, "mask": tumour.astype(np.uint8), "prediction": prediction.astype(np.uint8),
            "origin": np.zeros(3, np.int32), "spacing": np.array([1.0, 1.0, 1.0], np.float32)}


def write_run(output: str, name: str, epochs: int, cases: int, rng: np.random.Generator) -> None:
    store = Store(output, name)
    store.put_json("run.json", {"status": "finished", "started": 1.8e9 + rng.random() * 1e5,
                                "hyperparameters": {"lr": float(rng.choice([1e-3, 3e-3])), "epochs": epochs}})
    store.put_jsonl(RunLayout.METRICS, [epoch_line(epoch, rng) for epoch in range(1, epochs + 1)])
    rows = [{"case_id": f"case_{i:04d}", "dice": round(float(rng.random()), 4), "iou": 0.5, "truth_ml": 10.0,
             "predicted_ml": 9.0} for i in range(cases)]
    store.put_csv("metrics/test_per_case.csv", rows)
    store.put_json("summary.json", {"best_val_dice": 0.9, "test_dice_mean": float(np.mean([r["dice"] for r in rows]))})
    for row in rows:
        store.put_npz(f"predictions/{row['case_id']}.npz", crop(rng))


def timed(function):
    s3.reset_stats()
    started = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - started
    stats = s3.stats()
    return result, {"seconds": round(seconds, 3), "get_requests": stats["get_requests"],
                    "bytes_received": stats["bytes_received"], "list_requests": stats["list_requests"]}


def follow(output: str, epochs: int, rng: np.random.Generator) -> dict:
    """A run growing one epoch per write, polled after each write incrementally and whole."""
    store = Store(output, "growing")
    uri = store.url("metrics/metrics.jsonl")
    tail = MetricsTail(uri)
    history, incremental, whole = [], {"seconds": 0.0, "bytes": 0}, {"seconds": 0.0, "bytes": 0}
    for epoch in range(1, epochs + 1):
        history.append(epoch_line(epoch, rng))
        store.put_jsonl(RunLayout.METRICS, history)
        added, cost = timed(tail.poll)
        assert [line["epoch"] for line in added] == [epoch], added
        incremental["seconds"] += cost["seconds"]
        incremental["bytes"] += cost["bytes_received"]
        data, cost = timed(lambda: s3.read_uri(uri))
        assert data.count(b"\n") == epoch
        whole["seconds"] += cost["seconds"]
        whole["bytes"] += cost["bytes_received"]
    return {"polls": epochs, "file_bytes_at_end": len(data),
            "incremental": {"bytes_per_poll": round(incremental["bytes"] / epochs),
                            "ms_per_poll": round(1000 * incremental["seconds"] / epochs, 2)},
            "whole_file": {"bytes_per_poll": round(whole["bytes"] / epochs),
                           "ms_per_poll": round(1000 * whole["seconds"] / epochs, 2)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=500, help="metrics.jsonl lines per run")
    parser.add_argument("--cases", type=int, default=50, help="test cases (and crops) per run")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "review.json")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    with EmbeddedS3(latency_ms=args.latency_ms) as server:
        os.environ.update(server.environment())
        s3.reset_client()
        s3.client().create_bucket(Bucket=BUCKET)
        output = f"s3://{BUCKET}/runs"
        for index in range(args.runs):
            write_run(output, f"run-{index:02d}", args.epochs, args.cases, rng)
        runs, listing = timed(lambda: list_runs(output))
        assert len(runs) == args.runs and all(len(run.metrics) == args.epochs for run in runs)
        print(json.dumps({"listing": listing}), flush=True)
        with tempfile.TemporaryDirectory() as folder:
            page, report = timed(lambda: write_report(runs, Path(folder)))
            report["files"] = len(os.listdir(folder))
            report["bytes_written"] = sum(path.stat().st_size for path in Path(folder).iterdir())
            assert page.exists()
        print(json.dumps({"report": report}), flush=True)
        following = follow(output, min(args.epochs, 200), rng)
        print(json.dumps({"follow": following}), flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "setup": {"runs": args.runs, "epochs": args.epochs, "cases": args.cases, "latency_ms": args.latency_ms},
        "listing": listing, "report": report, "follow": following,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
