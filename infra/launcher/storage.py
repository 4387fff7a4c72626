"""A training job's storage sized to its data before launch.

The job keeps fetched bytes in a host cache (``--cache-gb``, on the instance's volume); a dataset
larger than the cache is read from S3 again every epoch, a GET per slice object for single-frame
series. Before a training job starts, the launcher lists the data prefix (one LIST per thousand
objects) and:

- sizes ``--cache-gb`` to hold the dataset with :data:`CACHE_HEADROOM` (never below the default
  20 GB; in process mode never above the free space where the cache lives, since a cache bound
  larger than the free space turns the cache off);
- sizes the instance volume (aws and local modes) to hold that cache plus :data:`VOLUME_OTHER_GB`
  for checkpoints, the model and the container's scratch (never below 100 GB, SageMaker's usual);
- where the user set either, keeps it and states what it costs at least: the fraction of reads the
  cache could serve at best and the request fee per hour at an A100's patch rate (least-recently-used
  eviction under a sampler that visits every case before any again serves fewer: the dry run's bill,
  :mod:`brainseg.run.forecast`, replays the run).
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from brainseg.io import s3
from infra.launcher.jobspec import DEFAULT_VOLUME_GB, JobSpec

CACHE_HEADROOM = 1.1  # the cache bound over the dataset's bytes (blocks are cached whole; eviction starts at 9/10)
DEFAULT_CACHE_GB = 20.0  # train.py's --cache-gb default
VOLUME_OTHER_GB = 30  # checkpoints, the model, logs and the container's scratch beside the cache
MIN_VOLUME_GB = DEFAULT_VOLUME_GB
SINGLE_FRAME_BYTES = 2 * 2**20  # a dataset whose median object is smaller holds one object per slice
# GETs per 4x128^3 four-sequence patch with no cache (BraTS-shaped studies, 155x240x240; measured by
# `python benchmarks/gpu_feed.py --packed`, docs/performance.md#packed-series).
COLD_GETS_PER_PATCH = {"single-frame": 225.0, "packed": 2.8}
PATCHES_PER_S = 6.74  # NVIDIA's nnU-Net on one A100, 4x128^3, AMP, batch 2 (as benchmarks/gpu_feed.py)
GET_USD_PER_1000 = 0.0004  # S3 Standard GET, us-east-1 list price


@dataclass(frozen=True)
class DatasetSize:
    """What a listing of the data prefix says: objects, their bytes and the median object's bytes
    (the header index under ``.brainseg/`` left out)."""

    objects: int
    bytes: int
    median_object_bytes: int

    @property
    def gb(self) -> float:
        return self.bytes / 1e9

    @property
    def kind(self) -> str:
        """``single-frame`` (one object per slice) or ``packed`` (one object per series), by object size."""
        return "single-frame" if self.median_object_bytes < SINGLE_FRAME_BYTES else "packed"


def dataset_size(uri: str) -> DatasetSize:
    """The objects and bytes under ``uri``.

    Raises:
        S3Error: the prefix cannot be listed.
    """
    bucket, prefix = s3.parse_uri(uri.rstrip("/") + "/")
    sizes = [info.size for info in s3.list_tree(bucket, prefix) if "/.brainseg/" not in f"/{info.key[len(prefix):]}"]
    return DatasetSize(len(sizes), sum(sizes), int(statistics.median(sizes)) if sizes else 0)


@dataclass(frozen=True)
class Storage:
    """The cache and volume a job gets, and whether the launcher chose them (else the user did)."""

    dataset: DatasetSize
    cache_gb: float
    volume_gb: int  # 0: none (process mode runs on this machine's disk)
    chose_cache: bool
    chose_volume: bool

    @property
    def hit_fraction(self) -> float:
        """The share of a uniform sampler's reads the cache can serve once warm (cache over dataset)."""
        return 1.0 if self.dataset.gb <= 0 else min(1.0, self.cache_gb / self.dataset.gb)

    @property
    def fee_per_hour(self) -> float:
        """USD of GET requests per hour for the reads the cache cannot serve, at :data:`PATCHES_PER_S`."""
        gets = (1.0 - self.hit_fraction) * COLD_GETS_PER_PATCH[self.dataset.kind]
        return gets * PATCHES_PER_S * 3600 * GET_USD_PER_1000 / 1000


def plan_storage(dataset: DatasetSize, cache_gb: float | None, volume_gb: int | None,
                 free_gb: float | None = None) -> Storage:
    """The job's cache and volume: the user's where given (``None``: not given), else sized to ``dataset``;
    ``free_gb``: the free space where the cache lives when that is this machine (process mode)."""
    needed = max(DEFAULT_CACHE_GB, math.ceil(round(dataset.gb * CACHE_HEADROOM, 6)))
    chose_cache = cache_gb is None
    if chose_cache:
        cache_gb = needed
        if free_gb is not None:
            cache_gb = min(cache_gb, max(0.0, math.floor(free_gb * 0.9)))
        if volume_gb is not None:
            cache_gb = min(cache_gb, max(0, volume_gb - VOLUME_OTHER_GB))
    chose_volume = volume_gb is None and free_gb is None
    if chose_volume:
        volume_gb = max(MIN_VOLUME_GB, int(math.ceil(cache_gb)) + VOLUME_OTHER_GB)
    return Storage(dataset, float(cache_gb), int(volume_gb or 0), chose_cache, chose_volume)


def storage_text(storage: Storage) -> str:
    """The launcher's lines on the job's storage."""
    data = storage.dataset
    lines = [f"data: {data.objects:,} objects, {data.gb:.1f} GB ({data.kind}: median object "
             f"{data.median_object_bytes / 2**20:.2f} MiB)"]
    how = "sized to hold the data" if storage.chose_cache else "as you set it"
    lines.append(f"cache: --cache-gb {storage.cache_gb:g} ({how})"
                 + (f"; volume {storage.volume_gb} GB ({'sized to hold the cache' if storage.chose_volume else 'as you set it'})"
                    if storage.volume_gb else ""))
    if storage.hit_fraction < 1.0:
        lines.append(f"the cache holds {100 * storage.hit_fraction:.0f}% of the data: at least "
                     f"{100 * (1 - storage.hit_fraction):.0f}% of training reads go to S3 every epoch, "
                     f"${storage.fee_per_hour:.2f}/h or more of GET requests at {PATCHES_PER_S} patches/s "
                     f"({COLD_GETS_PER_PATCH[data.kind]:g} GETs per uncached {data.kind} patch; the dry run's "
                     "bill replays the run, validation included)"
                     + ("; brainseg-pack makes that a few GETs per patch" if data.kind == "single-frame" else "")
                     + "; raise --cache-gb" + (" and --volume-size-gb" if storage.volume_gb else "")
                     + " to hold it")
    return "\n".join(lines)


def free_gb_at(folder: str) -> float:
    """Free GB on the file system that holds ``folder`` (or its nearest existing parent)."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free / 1e9


def sized_to_data(spec: JobSpec) -> JobSpec:
    """``spec`` with ``cache_gb`` and the volume sized to its data where the user left them, what that
    means printed. Data that cannot be listed from here (a dry run offline) leaves both at their
    defaults, and says so."""
    cache_gb = spec.hyperparameters.get("cache_gb")
    if cache_gb is not None and float(cache_gb) <= 0:
        return spec  # the cache turned off: nothing to size
    try:
        dataset = dataset_size(spec.data_uri)
    except s3.S3Error as err:
        print(f"data: not listed from here ({err}); --cache-gb and the volume keep their defaults", file=sys.stderr)
        return spec
    here = spec.mode != "aws"  # process and local modes cache on this machine's disk
    folder = spec.hyperparameters.get("cache_dir") or os.environ.get("BRAINSEG_CACHE_DIR") or tempfile.gettempdir()
    plan = plan_storage(dataset, None if cache_gb is None else float(cache_gb),
                        None if here else (spec.volume_size_gb or None), free_gb_at(folder) if here else None)
    print(storage_text(plan), file=sys.stderr)
    return replace(spec, hyperparameters={**spec.hyperparameters, "cache_gb": plan.cache_gb},
                   volume_size_gb=plan.volume_gb or spec.volume_size_gb)
