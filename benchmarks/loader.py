"""Loader benchmark: download-everything-first vs whole-object streaming vs ranged patch reads.

    python benchmarks/loader.py [--cases 20,200] [--shape 112,256,256] [--latency-ms 20]
                                [--patches 40] [--sequences t1c,t1,t2,flair] [--out benchmarks/results/loader.json]

One embedded S3 (moto, its own process) with an injected per-request latency holds the same
synthetic datasets for every method (one image series per case, or ``--sequences`` co-registered
series, every patch reading the same band of each). Each (method, dataset) is measured in a fresh
process so peak RSS is its own. Methods, all reading the same patch origins (96^3 by default):

  file        SageMaker File mode: download every object first, then read patches from disk
              with pydicom (time to first batch includes the download).
  whole       FastFile-like streaming: per patch, GET the whole objects it touches, decode with
              pydicom; the same read-ahead and S3 concurrency as ours.
  ours-band   brainseg PatchStream, one patch per slab and no margin: the pure band read.
  ours        brainseg PatchStream with its defaults (several patches per slab), started from
              the saved index without listing the prefix (every run but ours-cold does).
  ours-cold   as ``ours`` but without a saved index: listing and indexing run first (headers/s).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pydicom

ROOT = Path(__file__).resolve().parents[1]

from brainseg.data.catalog import build_catalog  # noqa: E402
from brainseg.data.sampling import plan_slab  # noqa: E402
from brainseg.data.stream import PatchStream  # noqa: E402
from brainseg.io import s3, s3_client  # noqa: E402
from brainseg.stream_config import StreamConfig  # noqa: E402
from infra.data.synth import SynthSpec, encode_case, write_files  # noqa: E402
from infra.s3server import EmbeddedS3  # noqa: E402

BUCKET = "bench"
BATCH = 2
READ_AHEAD = 4
METHODS = ("file", "whole", "ours-band", "ours", "ours-cold")


def _cpu_seconds() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system


def _peak_rss_mib() -> float:
    """This process's high-water RSS. ru_maxrss would carry the parent's peak across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status")


def _plans(catalog, patch_size, count):
    cases = catalog.split("train")
    config = StreamConfig(patch_size=patch_size, patches_per_slab=1, slab_margin=(0, 0))
    shapes = [c.image.shape for c in cases]
    points = [c.summary.foreground_points for c in cases]
    return cases, [plan_slab(slab_number, shapes, points, config) for slab_number in range(count)]


def _crop(planes: dict, plan) -> np.ndarray:
    z0, y0, x0 = plan.origins[0]
    d, h, w = plan.patch_extent
    volume = np.stack([planes[z] for z in range(z0, z0 + d)])
    return volume[:, y0:y0 + h, x0:x0 + w].astype(np.float32)


def _decode_objects(blobs: dict[str, bytes]) -> dict[str, np.ndarray]:
    return {key: pydicom.dcmread(io.BytesIO(data)).pixel_array for key, data in blobs.items()}


def _planes_of(series, arrays: dict[str, np.ndarray], z_range) -> dict[int, np.ndarray]:
    out = {}
    for z in z_range:
        obj, frame = series.planes[z]
        array = arrays[series.keys[obj]]
        out[z] = array[frame] if array.ndim == 3 else array
    return out


def _objects_for(series, z_range) -> list[str]:
    return sorted({series.keys[series.planes[z][0]] for z in z_range})


def _baseline_patch(plan, cases, load) -> list[np.ndarray]:
    """Image and mask crops of one patch from whole objects; ``load(series, keys)`` decodes them."""
    case = cases[plan.case_index]
    z_range = range(plan.origins[0][0], plan.origins[0][0] + plan.patch_extent[0])
    return [_crop(_planes_of(series, load(series, _objects_for(series, z_range)), z_range), plan)
            for series in (*case.images, case.mask)]


def measure(method: str, uri: str, patch_size: tuple, patches: int, sequences: tuple = ("image",)) -> dict:
    """Run one method in this process and return its figures."""
    started = time.perf_counter()
    cpu_started = _cpu_seconds()
    index_uri = f"s3://{BUCKET}/indexes/{uri.rstrip('/').rsplit('/', 1)[-1]}.json"
    if method == "ours-cold":
        index_uri += f".cold-{os.getpid()}"
    catalog = build_catalog(uri, index_uri=index_uri, split_fractions=(1.0, 0.0, 0.0),
                            trust_index=method != "ours-cold", sequences=sequences)
    catalog_seconds = time.perf_counter() - started
    cases, plans = _plans(catalog, patch_size, patches)
    s3.reset_stats()
    first_batch = None
    count = 0

    with contextlib.ExitStack() as stack:
        if method.startswith("ours"):
            config = StreamConfig(patch_size=patch_size, read_ahead=READ_AHEAD, augment=True,
                                  **({"patches_per_slab": 1, "slab_margin": (0, 0)} if method == "ours-band" else {}))
            stream = iter(PatchStream(cases, config))
            produced = (next(stream) for _ in range(patches))
        elif method == "whole":
            def load(series, keys):
                return _decode_objects(dict(zip(keys, s3.executor().map(
                    lambda key: s3.get_object(series.bucket, key), keys))))

            pool = stack.enter_context(ThreadPoolExecutor(READ_AHEAD))
            produced = pool.map(lambda plan: _baseline_patch(plan, cases, load), plans)
        elif method == "file":
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="filemode-"))
            keys = [key for case in catalog.cases for series in (*case.images, case.mask) if series
                    for key in series.keys]

            def download(key):
                path = Path(folder) / key
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(s3.get_object(BUCKET, key))

            list(s3.executor().map(download, keys))
            download_seconds = time.perf_counter() - started

            def load(series, keys):
                return {key: pydicom.dcmread(Path(folder) / key).pixel_array for key in keys}

            pool = stack.enter_context(ThreadPoolExecutor(READ_AHEAD))
            produced = pool.map(lambda plan: _baseline_patch(plan, cases, load), plans)
        else:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        for _ in produced:
            count += 1
            if count == BATCH:
                first_batch = time.perf_counter() - started

    total = time.perf_counter() - started
    stats = s3.stats()
    steady = total - first_batch
    case = cases[0]
    band_bytes = int(np.prod(patch_size[:2]) * case.image.shape[2]
                     * sum(series.bytes_per_voxel for series in (*case.images, case.mask)))
    result = {
        "method": method,
        "uri": uri,
        "sequences": len(sequences),
        "cases": len(catalog.cases),
        "patches": count,
        "catalog_seconds": round(catalog_seconds, 3),
        "index": catalog.index_stats,
        "time_to_first_batch_s": round(first_batch, 3),
        "patches_per_s": round((count - BATCH) / steady, 2) if steady > 0 else None,
        "get_requests_per_patch": round(stats["get_requests"] / count, 1),
        "mib_per_patch": round(stats["bytes_received"] / count / 2**20, 3),
        "band_bound_mib_per_patch": round(band_bytes / 2**20, 3),
        "bytes_vs_band_bound": round(stats["bytes_received"] / count / band_bytes, 3),
        "cpu_s_per_patch": round((_cpu_seconds() - cpu_started) / count, 3),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
    }
    if method == "file":
        result["download_s"] = round(download_seconds, 2)
    return result


def _write_datasets(cases: list[int], shape: tuple, multiframe: bool, jobs: int,
                    sequences: tuple = ("image",)) -> dict[int, str]:
    """Write the largest dataset; smaller ones are its first cases under their own prefixes."""
    layout = ("mf" if multiframe else "sf") + f"{len(sequences)}"
    uris = {n: f"s3://{BUCKET}/{layout}-{n}/" for n in cases}
    spec = SynthSpec(shape=shape, spacing=(1.0, 1.0, 1.0), multiframe=multiframe, sequences=sequences)

    def write(index: int) -> None:
        files = encode_case(index, spec)
        for n, uri in uris.items():
            if index < n:
                write_files(files, uri)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(write, range(max(cases))))
    return uris


def _delete_prefix(uri: str) -> None:
    bucket, prefix = s3.parse_uri(uri)
    keys = [info.key for info in s3.list_objects(bucket, prefix)]
    for start in range(0, len(keys), 1000):
        s3.client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[start:start + 1000]]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="20,200", help="dataset sizes, comma-separated")
    parser.add_argument("--shape", default="112,256,256", help="D,H,W of each synthetic volume")
    parser.add_argument("--patch", default="96,96,96")
    parser.add_argument("--patches", type=int, default=96, help="patches measured per run")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--layouts", default="single-frame,multi-frame")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sequences", default="image", help="image (one series per case) or sequence folders, "
                        "e.g. t1c,t1,t2,flair")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "loader.json")
    parser.add_argument("--measure", nargs=5, metavar=("METHOD", "URI", "PATCH", "PATCHES", "SEQUENCES"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        method, uri, patch, patches, sequences = args.measure
        print(json.dumps(measure(method, uri, tuple(int(v) for v in patch.split(",")), int(patches),
                                 tuple(sequences.split(",")))))
        return 0
    sequences = tuple(name.strip() for name in args.sequences.split(","))

    cases = sorted(int(v) for v in args.cases.split(","))
    shape = tuple(int(v) for v in args.shape.split(","))
    results = []
    with EmbeddedS3(latency_ms=args.latency_ms) as server:
        os.environ.update(server.environment())
        s3.reset_client()
        s3.client().create_bucket(Bucket=BUCKET)
        for layout in args.layouts.split(","):
            started = time.perf_counter()
            uris = _write_datasets(cases, shape, layout == "multi-frame", jobs=8, sequences=sequences)
            print(f"# wrote {layout} datasets {cases} in {time.perf_counter() - started:.0f} s", flush=True)
            for n in cases:
                build_catalog(uris[n], index_uri=f"s3://{BUCKET}/indexes/{uris[n].rstrip('/').rsplit('/', 1)[-1]}.json",
                              split_fractions=(1.0, 0.0, 0.0), sequences=sequences)
                for method in args.methods.split(","):
                    child = subprocess.run([sys.executable, __file__, "--measure", method, uris[n], args.patch,
                                            str(args.patches), ",".join(sequences)], capture_output=True, text=True,
                                           env=dict(os.environ))
                    if child.returncode != 0:
                        print(child.stderr[-3000:], file=sys.stderr)
                        return 1
                    row = json.loads(child.stdout.strip().splitlines()[-1])
                    row["layout"] = layout
                    results.append(row)
                    print(json.dumps(row), flush=True)
            for uri in uris.values():
                _delete_prefix(uri)
    report = {"latency_ms": args.latency_ms, "shape": shape, "patch": args.patch, "sequences": sequences, "batch": BATCH,
              "read_ahead": READ_AHEAD, "s3_concurrency": s3_client.MAX_CONCURRENCY, "cpu_count": os.cpu_count(),
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(format_table(results))
    print(f"# written to {args.out}")
    return 0


def format_table(results: list[dict]) -> str:
    header = ("| layout | sequences | cases | method | first batch s | patches/s | GETs/patch | MiB/patch "
              "| vs band bound | CPU s/patch | peak RSS MiB |")
    lines = [header, "|" + "---|" * 11]
    for r in results:
        lines.append(f"| {r['layout']} | {r['sequences']} | {r['cases']} | {r['method']} | {r['time_to_first_batch_s']} | "
                     f"{r['patches_per_s']} | {r['get_requests_per_patch']} | {r['mib_per_patch']} | "
                     f"{r['bytes_vs_band_bound']} | {r['cpu_s_per_patch']} | {r['peak_rss_mib']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
