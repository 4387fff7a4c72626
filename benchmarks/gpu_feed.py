"""Can the stream feed a GPU? Worker CPU, GETs and bytes per patch, cold and with the local cache.

    python benchmarks/gpu_feed.py [--cases 4] [--patches 64] [--latency-ms 20] [--patch 128,128,128]
                                  [--grids shared|own] [--out benchmarks/results/gpu_feed.json]

BraTS-shaped studies (4 sequences + mask, 155x240x240, single-frame objects; with ``--grids own``
the T1, T2 and FLAIR on grids of their own as infra/data/grids.py writes them, read through their
geometry onto the T1c's) in the embedded S3
with ``--latency-ms`` added to every request. The worker path (PatchStream: read, decode,
resample, crop, normalise, and draw each patch's augmentation, which the trainer applies on its
device) runs in this process; "epoch 1" is ``--patches`` patches with an empty cache, "epoch 2"
``--patches`` other patches (another seed) of the same cases once they have been read (the cache
is warm). Each pass counts the CPU and reads of a fresh stream until it is closed.
Reports worker CPU-seconds per patch (this process's user+system time; the S3 server runs in its
own process), GETs and MiB per patch per epoch, the vCPUs that 6.74 patches/s would need (NVIDIA's
nnU-Net on one A100, 4x128^3, AMP, batch 2), and the request fee over a 100-epoch run as a share of
an ml.g5.xlarge hour at that rate.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]

from brainseg.config import StreamConfig  # noqa: E402
from brainseg.data.catalog import build_catalog  # noqa: E402
from brainseg.data.stream import PatchStream  # noqa: E402
from brainseg.io import cache, s3  # noqa: E402
from brainseg.io.cache import io_counters  # noqa: E402
from infra.data.synth import SynthSpec, write_dataset  # noqa: E402
from infra.s3server import EmbeddedS3  # noqa: E402

SEQUENCES = ("t1c", "t1", "t2", "flair")
TARGET_PATCHES_PER_S = 6.74  # NVIDIA's nnU-Net, one A100, 4x128^3, AMP, batch 2
GET_USD_PER_1000 = 0.0004  # S3 Standard GET, us-east-1 list price
INSTANCE_USD_PER_HOUR = 1.408  # ml.g5.xlarge training, us-east-1 list price
EPOCHS = 100


def _cpu_seconds() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system


def _measure(stream: PatchStream, count: int) -> dict:
    """``count`` patches from a fresh iterator of ``stream``, counting everything it did until it was
    closed (its read-ahead beyond the last patch included)."""
    reads, cpu, wall = io_counters(), _cpu_seconds(), time.perf_counter()
    samples = iter(stream)
    for _ in range(count):
        next(samples)
    wall = time.perf_counter() - wall
    samples.close()  # waits for the reads in flight
    reads = [after - before for before, after in zip(reads, io_counters())]
    cpu = _cpu_seconds() - cpu
    return {"patches": count, "cpu_s_per_patch": cpu / count, "wall_s_per_patch": wall / count,
            "gets_per_patch": reads[0] / count, "mib_per_patch": reads[1] / count / 2**20,
            "cache_hit_fraction": reads[2] / max(reads[2] + reads[3], 1)}


def run(args) -> dict:
    patch = tuple(int(v) for v in args.patch.split(","))
    with EmbeddedS3(latency_ms=args.latency_ms) as server:
        os.environ.update(server.environment())
        s3.reset_client()
        s3.create_bucket("bench")
        data = "s3://bench/brats/"
        started = time.perf_counter()
        write_dataset(args.cases, data, SynthSpec(shape=(155, 240, 240), spacing=(1.0, 1.0, 1.0), sequences=SEQUENCES,
                                                   grids=args.grids), jobs=2)
        written = time.perf_counter() - started
        catalog = build_catalog(data, sequences=SEQUENCES)
        cases = catalog.cases
        report = {"cases": len(cases), "patch": patch, "latency_ms": args.latency_ms, "sequences": SEQUENCES,
                  "grids": args.grids, "resampled": {name: volume.describe() for name, volume in cases[0].resampled.items()},
                  "write_seconds": written, "cpu_count": os.cpu_count(), "modes": {}}
        for augment in (True, False):
            with tempfile.TemporaryDirectory() as folder:
                cache.configure(folder, 8)
                first, second = (_measure(PatchStream(cases, StreamConfig(patch_size=patch, augment=augment,
                                                                          memory_budget_bytes=4 * 2**30, seed=seed),
                                                      batch_size=2), args.patches)
                                 for seed in (1, 2))  # the second pass draws other slabs of the same, cached cases
                cache.disable()
            averaged_gets = (first["gets_per_patch"] + (EPOCHS - 1) * second["gets_per_patch"]) / EPOCHS
            fee_per_hour = averaged_gets * TARGET_PATCHES_PER_S * 3600 * GET_USD_PER_1000 / 1000
            report["modes"]["augmentation drawn" if augment else "no augmentation"] = {
                "epoch1": first, "epoch2": second,
                "vcpus_for_target_epoch2": second["cpu_s_per_patch"] * TARGET_PATCHES_PER_S,
                "request_usd_per_hour_100_epochs": fee_per_hour,
                "request_fee_share_of_instance": fee_per_hour / INSTANCE_USD_PER_HOUR}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--patches", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--patch", default="128,128,128")
    parser.add_argument("--grids", choices=("shared", "own"), default="shared",
                        help="own: the T1, T2 and FLAIR on grids of their own (oblique, sagittal, thick axial)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_feed.json"))
    args = parser.parse_args()
    report = run(args)
    for mode, figures in report["modes"].items():
        for epoch in ("epoch1", "epoch2"):
            row = figures[epoch]
            print(f"{mode:24s} {epoch}: cpu {row['cpu_s_per_patch']:.3f} s/patch, wall {row['wall_s_per_patch']:.3f} "
                  f"s/patch, {row['gets_per_patch']:.1f} GETs/patch, {row['mib_per_patch']:.2f} MiB/patch, "
                  f"cache hits {row['cache_hit_fraction']:.2f}")
        print(f"{mode:24s} vCPUs for {TARGET_PATCHES_PER_S} patches/s (epoch 2): "
              f"{figures['vcpus_for_target_epoch2']:.1f}; request fee over {EPOCHS} epochs: "
              f"${figures['request_usd_per_hour_100_epochs']:.3f}/h = "
              f"{100 * figures['request_fee_share_of_instance']:.1f}% of an ml.g5.xlarge hour")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
