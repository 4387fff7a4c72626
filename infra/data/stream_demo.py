"""Demo of the data plane, no AWS account needed.

    brainseg-stream-demo [--cases 8] [--batches 20] [--data-uri s3://...]

Starts an embedded S3 (moto server on 127.0.0.1) unless ``--data-uri`` is given, writes a
synthetic DICOM dataset into it, checks and profiles it, then streams batches of patches through
a DataLoader with two workers and prints throughput, requests and bytes per patch.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch
from torch.utils.data import DataLoader

from brainseg.data.catalog import build_catalog
from brainseg.data.stream import PatchStream
from brainseg.io import s3
from brainseg.stream_config import StreamConfig
from infra.data.profile import format_profile, profile_catalog
from infra.data.synth import SynthSpec, write_dataset
from infra.s3server import EmbeddedS3

logger = logging.getLogger("stream_demo")


def stream(uri: str, batches: int, patch_size: tuple) -> None:
    catalog = build_catalog(uri)
    print(format_profile(profile_catalog(catalog)))
    config = StreamConfig(patch_size=patch_size, memory_budget_bytes=512 * 2**20)
    loader = DataLoader(PatchStream(catalog.split("train"), config), batch_size=2, num_workers=2)
    started = time.perf_counter()
    foreground = patches = 0
    for number, batch in enumerate(loader, start=1):
        if number == 1:
            print(f"first batch after {time.perf_counter() - started:.2f} s: image {tuple(batch['image'].shape)} "
                  f"{batch['image'].dtype}, label {tuple(batch['label'].shape)}, cases {batch['case_id']}")
        patches += batch["image"].shape[0]
        foreground += int((batch["label"].flatten(1).sum(1) > 0).sum())
        if number == batches:
            break
    seconds = time.perf_counter() - started
    print(f"streamed {patches} patches in {seconds:.2f} s ({patches / seconds:.1f} patches/s, 2 workers); "
          f"{100 * foreground / patches:.0f}% contain tumour")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-uri", help="an existing dataset; default: a synthetic one in an embedded S3")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--patch-size", default="64,64,64")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    patch_size = tuple(int(v) for v in args.patch_size.split(","))
    torch.set_num_threads(1)
    try:
        if args.data_uri:
            stream(args.data_uri, args.batches, patch_size)
            return 0
        with EmbeddedS3() as server:
            os.environ.update(server.environment())
            s3.reset_client()
            s3.client().create_bucket(Bucket="demo")
            uri = "s3://demo/brain-mri/"
            started = time.perf_counter()
            write_dataset(args.cases, uri, SynthSpec(shape=(96, 128, 128)), jobs=2)
            print(f"embedded S3 at {server.endpoint_url}: wrote {args.cases} synthetic cases to {uri} "
                  f"in {time.perf_counter() - started:.1f} s")
            stream(uri, args.batches, patch_size)
    except (ValueError, s3.S3Error) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
