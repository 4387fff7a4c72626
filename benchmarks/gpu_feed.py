"""Can the stream feed a GPU? Worker CPU, GETs and bytes per patch, cold and with the local cache.

    python benchmarks/gpu_feed.py [--cases 4] [--patches 64] [--latency-ms 20] [--patch 128,128,128]
                                  [--grids shared|own] [--packed] [--out benchmarks/results/gpu_feed.json]

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
an ml.g5.xlarge hour at that rate. With ``--packed`` the studies are also packed (infra/data/pack.py:
one multi-frame object per series) and measured again, and both are measured once more without a
cache ("uncached": every read from S3, the limit of a dataset far larger than the cache).
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

from brainseg.data.catalog import build_catalog  # noqa: E402
from brainseg.data.stream import PatchStream  # noqa: E402
from brainseg.io import cache, s3  # noqa: E402
from brainseg.io.cache import io_counters  # noqa: E402
from brainseg.stream_config import StreamConfig  # noqa: E402
from infra.data import pack  # noqa: E402
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


def _passes(cases: list, patch: tuple, augment: bool, count: int, uncached: bool) -> dict:
    """Epoch 1 (empty cache) and 2 (warm) of ``count`` patches each, and with ``uncached`` a pass
    with no cache at all (every read from S3, as when the data is far larger than the cache)."""
    stream = lambda seed: PatchStream(cases, StreamConfig(patch_size=patch, augment=augment,
                                                          memory_budget_bytes=4 * 2**30, seed=seed), batch_size=2)
    with tempfile.TemporaryDirectory() as folder:
        cache.configure(folder, 8)
        # the second pass draws other slabs of the same, cached cases
        figures = {"epoch1": _measure(stream(1), count), "epoch2": _measure(stream(2), count)}
        cache.disable()
    if uncached:
        figures["uncached"] = _measure(stream(3), count)
    averaged_gets = (figures["epoch1"]["gets_per_patch"] + (EPOCHS - 1) * figures["epoch2"]["gets_per_patch"]) / EPOCHS
    figures.update(_fee("request_usd_per_hour_100_epochs", averaged_gets),
                   vcpus_for_target_epoch2=figures["epoch2"]["cpu_s_per_patch"] * TARGET_PATCHES_PER_S)
    if uncached:
        figures.update(_fee("request_usd_per_hour_uncached", figures["uncached"]["gets_per_patch"]))
    return figures


def _fee(name: str, gets_per_patch: float) -> dict:
    """The request fee per hour at the target rate, and its share of an ml.g5.xlarge hour."""
    per_hour = gets_per_patch * TARGET_PATCHES_PER_S * 3600 * GET_USD_PER_1000 / 1000
    return {name: per_hour, name.replace("request_usd_per_hour", "share_of_instance"): per_hour / INSTANCE_USD_PER_HOUR}


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
            report["modes"]["augmentation drawn" if augment else "no augmentation"] = _passes(
                cases, patch, augment, args.patches, args.packed and augment)
        if args.packed:
            packed = pack.pack(data, "s3://bench/packed/", jobs=2)
            report["pack"] = {key: packed[key] for key in ("objects_before", "bytes_before", "objects_after",
                                                            "bytes_after", "series_packed", "seconds")}
            cases = build_catalog("s3://bench/packed/", sequences=SEQUENCES).cases
            report["modes"]["packed, augmentation drawn"] = _passes(cases, patch, True, args.patches, True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--patches", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--patch", default="128,128,128")
    parser.add_argument("--grids", choices=("shared", "own"), default="shared",
                        help="own: the T1, T2 and FLAIR on grids of their own (oblique, sagittal, thick axial)")
    parser.add_argument("--packed", action="store_true",
                        help="also pack the studies (brainseg-pack) and measure the packed copy, and a pass without a cache")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_feed.json"))
    args = parser.parse_args()
    report = run(args)
    for mode, figures in report["modes"].items():
        for epoch in ("epoch1", "epoch2", "uncached"):
            if epoch not in figures:
                continue
            row = figures[epoch]
            print(f"{mode:27s} {epoch}: cpu {row['cpu_s_per_patch']:.3f} s/patch, wall {row['wall_s_per_patch']:.3f} "
                  f"s/patch, {row['gets_per_patch']:.1f} GETs/patch, {row['mib_per_patch']:.2f} MiB/patch, "
                  f"cache hits {row['cache_hit_fraction']:.2f}")
        print(f"{mode:27s} vCPUs for {TARGET_PATCHES_PER_S} patches/s (epoch 2): "
              f"{figures['vcpus_for_target_epoch2']:.1f}; request fee over {EPOCHS} epochs: "
              f"${figures['request_usd_per_hour_100_epochs']:.3f}/h = "
              f"{100 * figures['share_of_instance_100_epochs']:.1f}% of an ml.g5.xlarge hour")
        if "uncached" in figures:
            print(f"{mode:27s} without a cache: ${figures['request_usd_per_hour_uncached']:.3f}/h = "
                  f"{100 * figures['share_of_instance_uncached']:.1f}% of an ml.g5.xlarge hour")
    if "pack" in report:
        packed = report["pack"]
        print(f"packed {packed['series_packed']} series in {packed['seconds']} s: {packed['objects_before']} objects, "
              f"{packed['bytes_before'] / 2**20:.0f} MiB -> {packed['objects_after']} objects, "
              f"{packed['bytes_after'] / 2**20:.0f} MiB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
