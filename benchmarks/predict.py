"""Prediction benchmark: seconds and bytes read per case for 112x256x256 four-sequence studies on CPU.

    python benchmarks/predict.py [--cases 2] [--shape 112,256,256] [--mirror] [--out benchmarks/results/predict.json]

An embedded S3 (moto, its own process) holds ``--cases`` synthetic studies (t1c, t1, t2, flair; no
mask, as new studies come, so nothing is scored) and a model artifact of the default network (U-Net 16-32-64-128-256, patch 96^3, three BraTS
regions; random weights: speed does not depend on them). ``predict.py``'s job runs in this process
on the CPU, once cold (the header index is built) and once warm (the index is reused), each into a
fresh output; the warm run is the per-case figure. Bytes read per case are the S3 bytes received (headers,
the intensity slices, every voxel of every sequence, and the source headers for the SEG) less the
model file, which a job reads once; next to the dataset's stored bytes per case.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from brainseg.environment import read_environment
from brainseg.io import s3
from brainseg.model.artifact import artifact_bytes
from brainseg.model.description import ModelDescription
from brainseg.model.networks import NetworkSpec, build_model
from brainseg.prediction.job import PredictionJob
from brainseg.prediction.options import PredictOptions
from infra.data.synth import SynthSpec, write_dataset
from infra.s3server import EmbeddedS3

BUCKET = "bench-predict"
SEQUENCES = ("t1c", "t1", "t2", "flair")


def _peak_rss_mib() -> float:
    """This process's high-water RSS (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _model_bytes(spacing: tuple) -> bytes:
    spec = NetworkSpec(in_channels=len(SEQUENCES), out_channels=3)
    torch.manual_seed(0)
    description = ModelDescription(network=asdict(spec), task="segmentation", sequences=SEQUENCES,
                                   labels="ncr=1,ed=2,et=4", regions="brats", target_spacing=spacing,
                                   normalization="zscore", patch_size=(96, 96, 96), sw_overlap=0.25,
                                   run_name="benchmark")
    return artifact_bytes(description, build_model(spec).state_dict())


def _run(output: str, mirror: bool) -> dict:
    options = PredictOptions(model=(f"s3://{BUCKET}/model/model.pt",), data_uri=f"s3://{BUCKET}/data/",
                             output_uri=output, mirror=mirror)
    s3.reset_stats()
    started = time.perf_counter()
    counts = PredictionJob(options, read_environment(), torch.device("cpu")).run()
    wall = time.perf_counter() - started
    stats = s3.stats()
    rows = list(csv.DictReader(io.StringIO(s3.read_uri(output + "predictions.csv").decode())))
    return {"counts": counts, "wall_seconds": round(wall, 1), "get_requests": stats["get_requests"],
            "bytes_received": stats["bytes_received"], "case_seconds": [float(row["seconds"]) for row in rows]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--shape", default="112,256,256", help="D,H,W of every series")
    parser.add_argument("--mirror", action="store_true", help="also time test-time mirroring (8x the inference)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/predict.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    shape = tuple(int(v) for v in args.shape.split(","))
    spec = SynthSpec(shape=shape, spacing=(1.0, 1.0, 1.0), sequences=SEQUENCES)
    with EmbeddedS3() as server:
        os.environ.update(server.environment())
        s3.reset_client()
        s3.client().create_bucket(Bucket=BUCKET)
        write_dataset(args.cases, f"s3://{BUCKET}/data/", spec)
        stored = 0
        for info in list(s3.list_objects(BUCKET, "data/")):
            if "/mask/" in info.key:
                s3.delete(f"s3://{BUCKET}/{info.key}")
            else:
                stored += info.size
        model = _model_bytes(spec.spacing)
        s3.put_bytes(f"s3://{BUCKET}/model/model.pt", model)
        threads = torch.get_num_threads()
        runs = {"cold": _run(f"s3://{BUCKET}/out-cold/", False), "warm": _run(f"s3://{BUCKET}/out-warm/", False)}
        if args.mirror:
            runs["mirror"] = _run(f"s3://{BUCKET}/out-mirror/", True)
    per_case = {name: {"seconds_per_case": round(run["wall_seconds"] / args.cases, 1),
                       "bytes_read_per_case": (run["bytes_received"] - len(model)) // args.cases,
                       "get_requests_per_case": run["get_requests"] // args.cases}
                for name, run in runs.items()}
    result = {"benchmark": "predict", "shape": list(shape), "sequences": list(SEQUENCES), "cases": args.cases,
              "stored_bytes_per_case": stored // args.cases, "model_bytes": len(model), "torch_threads": threads,
              "cpu_count": os.cpu_count(), "peak_rss_mib": round(_peak_rss_mib()),
              "per_case": per_case, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name, figures in per_case.items():
        print(f"{name}: {figures['seconds_per_case']} s/case, {figures['bytes_read_per_case'] / 2**20:.1f} MiB "
              f"read/case ({figures['get_requests_per_case']} GETs) of {stored / args.cases / 2**20:.1f} MiB stored")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
