"""The bill before launch, checked and at BraTS scale.

    python benchmarks/bill.py [--studies 20] [--out benchmarks/results/bill.json]

1. **Checked**: the demo's 24 four-sequence studies (48x96x96, single-frame) in the embedded S3,
   trained in this process for 3 epochs of 50 steps (the demo's other settings) with the host
   cache holding the data, with a cache a third of the data, and with none; each run's summary
   sets its forecast (logged before the first step) beside what it counted (steps, GETs, MiB).
2. **BraTS scale**: ``--studies`` BraTS-shaped studies (155 slices of 16x16 pixels: the object count
   and block structure of 240x240 slices, each slice one cache block either way, not their bytes),
   indexed, grown to BraTS 2023 GLI's 1,251 by copying (as benchmarks/scale.py), and the reads of
   a default-length run (50 epochs of 250 steps, batch 2, 4x128^3 patches, one GPU, 4 workers)
   forecast single-frame and packed, with a cache holding the data and with the default 20 GB
   cache against BraTS's 110 GB (the same fraction of these bytes), and the bill on ml.g5.xlarge
   priced from the forecast; the forecast's own seconds.
3. **Eviction**: the same BraTS-sized runs with the cache holding a fifth and a half of the data,
   replayed under the host cache's least-recently-used eviction and under a stable subset (whole
   objects evicted in a fixed hashed order, so the same objects stay whatever the access order),
   the alternative when reads cycle over more data than the cache holds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scale import BRATS_STUDIES, SEQUENCES, cloned  # noqa: E402
from brainseg.bill import bill, bill_text, patch_rate  # noqa: E402
from brainseg.commands import train  # noqa: E402
from brainseg.data.catalog import build_catalog  # noqa: E402
from brainseg.data.resample import NATIVE  # noqa: E402
from brainseg.io import s3  # noqa: E402
from brainseg.io.cache import EVICT_TO  # noqa: E402
from brainseg.run import forecast  # noqa: E402
from brainseg.run.forecast import CacheModel, forecast_reads  # noqa: E402
from brainseg.run.requests import stored_objects  # noqa: E402
from brainseg.stream_config import StreamConfig  # noqa: E402
from infra.data import pack  # noqa: E402
from infra.data.synth import SynthSpec, write_dataset  # noqa: E402
from infra.launcher.demo import DEMO_CASES, DEMO_HYPERPARAMETERS, DEMO_SEQUENCES, DEMO_SHAPE  # noqa: E402
from infra.launcher.jobspec import sagemaker_cli_args  # noqa: E402
from infra.s3server import EmbeddedS3  # noqa: E402

BRATS_GB, DEFAULT_CACHE_GB = 110.0, 20.0  # BraTS 2023 GLI on S3; train.py's --cache-gb default
RUN = {"epochs": 50, "steps_per_epoch": 250, "batch_size": 2, "patch": (128, 128, 128), "workers": 4}


def checked(data: str, output: str, dataset_bytes: int) -> dict:
    """Three short demo-settings runs, their summaries' forecast against what they counted."""
    runs = {}
    for name, cache_gb in (("cache holds the data", 1.0), ("cache a third of the data", dataset_bytes / 3e9),
                           ("no cache", 0.0)):
        hp = {**DEMO_HYPERPARAMETERS, "epochs": 3, "steps_per_epoch": 50, "cache_gb": cache_gb,
              "cache_dir": tempfile.mkdtemp(prefix="bill-cache-"), "run_name": f"bill-{len(runs)}",
              "data_uri": data, "output_uri": output}
        started = time.perf_counter()
        assert train.main(sagemaker_cli_args(hp)) == 0
        summary = json.loads(s3.read_uri(f"{output}/{hp['run_name']}/summary.json"))
        forecast, actual = summary["bill"]["forecast"], summary["bill"]["actual"]
        runs[name] = {"cache_gb": round(cache_gb, 4), "seconds": round(time.perf_counter() - started, 1),
                      **{key: {"forecast": forecast[key], "actual": actual[key],
                               "ratio": round(forecast[key] / actual[key], 3) if actual[key] else None}
                         for key in ("steps", "gets", "mib", "gets_first_epoch", "gets_later_epoch")}}
        print(json.dumps({name: runs[name]}), flush=True)
    return runs


def brats_cases(uri: str) -> tuple[list, list, int]:
    """``uri``'s studies indexed and grown to 1,251: a 50/20/30 split's training and validation
    cases, and the bytes of their objects."""
    catalog = cloned(build_catalog(uri, sequences=SEQUENCES), BRATS_STUDIES)
    train_cases = list(catalog.cases[:BRATS_STUDIES // 2])
    val_cases = list(catalog.cases[BRATS_STUDIES // 2:BRATS_STUDIES // 2 + BRATS_STUDIES // 5])
    return train_cases, val_cases, sum(stored_objects((*train_cases, *val_cases)).values())


def at_scale(uri: str, label: str) -> dict:
    """A default-length run's forecast reads on ``uri``'s studies grown to 1,251, and its bill."""
    train_cases, val_cases, stored = brats_cases(uri)
    config = StreamConfig(patch_size=RUN["patch"])
    out = {"train_cases": len(train_cases), "val_cases": len(val_cases), "stored_mb": round(stored / 1e6, 1)}
    for name, cache_bytes in (("cache holds the data", 10 * stored),
                              ("default 20 GB cache, 110 GB data", int(stored * DEFAULT_CACHE_GB / BRATS_GB))):
        started = time.perf_counter()
        gets, read = forecast_reads(train_cases, val_cases, config, NATIVE, epochs=RUN["epochs"],
                                    patches_per_epoch=RUN["steps_per_epoch"] * RUN["batch_size"],
                                    cache_bytes=cache_bytes, workers=RUN["workers"])
        seconds = time.perf_counter() - started
        rate, source = patch_rate("ml.g5.xlarge", (len(SEQUENCES), *RUN["patch"]))
        made = bill(steps=RUN["epochs"] * RUN["steps_per_epoch"], patches_per_step=RUN["batch_size"],
                    patches_per_s=rate, rate_source=source, instance_type="ml.g5.xlarge", instance_count=1,
                    epoch_gets=gets, epoch_bytes=read, get_usd_per_1000=0.0004, volume_gb=151)
        print(f"{label}, {name}:\n{bill_text(made)}", flush=True)
        out[name] = {"forecast_seconds": round(seconds, 1), "gets_per_epoch": gets, "gets": sum(gets),
                     "gets_first_epoch": gets[0], "gets_later_epoch_mean": round(sum(gets[1:]) / (len(gets) - 1), 1),
                     "bill_ml_g5_xlarge": made.to_json()}
        print(json.dumps({label: {name: {k: v for k, v in out[name].items() if k != "bill_ml_g5_xlarge"}}}), flush=True)
    return out


class StableSubset(CacheModel):
    """The cache evicting whole objects in a fixed hashed order rather than the least recently used."""

    def _evict(self) -> None:
        for block in sorted(self.blocks, key=lambda b: hashlib.md5(repr(b[:2]).encode()).digest(), reverse=True):
            if self.held <= EVICT_TO * self.max_bytes:
                break
            self.held -= self.blocks.pop(block)


def eviction(uri: str, label: str) -> dict:
    """Run GETs of the BraTS-sized default run under LRU and a stable subset, a fifth and half cached."""
    train_cases, val_cases, stored = brats_cases(uri)
    out = {}
    for policy, model in (("least recently used", CacheModel), ("stable subset", StableSubset)):
        forecast.CacheModel = model
        try:
            for share in (0.2, 0.5):
                gets, _ = forecast_reads(train_cases, val_cases, StreamConfig(patch_size=RUN["patch"]), NATIVE,
                                         epochs=RUN["epochs"], patches_per_epoch=RUN["steps_per_epoch"] * RUN["batch_size"],
                                         cache_bytes=int(stored * share), workers=RUN["workers"])
                out[f"{policy}, cache {share:.0%} of the data"] = {"gets": sum(gets), "gets_first_epoch": gets[0],
                                                                   "gets_later_epoch_mean": round(sum(gets[1:]) / (len(gets) - 1))}
        finally:
            forecast.CacheModel = CacheModel
    print(json.dumps({label: out}), flush=True)
    return out


def run(args) -> dict:
    report = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "run": RUN}
    with EmbeddedS3() as server:
        os.environ.update(server.environment())
        s3.reset_client()
        s3.create_bucket("bill")
        demo = "s3://bill/demo/"
        written = write_dataset(DEMO_CASES, demo, SynthSpec(shape=DEMO_SHAPE, sequences=DEMO_SEQUENCES), jobs=2)
        report["checked"] = checked(demo, "s3://bill/runs", written)
        brats, packed = "s3://bill/brats/", "s3://bill/packed/"
        write_dataset(args.studies, brats, SynthSpec(shape=(155, 16, 16), spacing=(1.0, 1.0, 1.0), sequences=SEQUENCES),
                      jobs=2)
        pack.pack(brats, packed, jobs=2)
        report["brats"] = {"studies_written": args.studies, "single_frame": at_scale(brats, "single-frame"),
                           "packed": at_scale(packed, "packed")}
        report["eviction"] = {"single_frame": eviction(brats, "single-frame"), "packed": eviction(packed, "packed")}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20, help="BraTS-shaped studies written (then copied to 1,251)")
    parser.add_argument("--out", default="benchmarks/results/bill.json")
    args = parser.parse_args()
    report = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
