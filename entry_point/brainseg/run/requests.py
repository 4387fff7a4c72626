"""What a run's S3 reads cost: GETs, bytes and cache hits per epoch, and the request fee they add up
to at ``--get-price-per-1000`` (the epoch line's fields and the summary's ``s3_requests``); and,
before the first read, whether the training cases fit the host's cache (:func:`cache_fit`)."""

from __future__ import annotations

import torch

from brainseg.run import distributed
from brainseg.stream_config import MiB


def request_fields(train_reads: list[int], validation_reads: list[int], patches: int, price_per_1000: float,
                   device: torch.device) -> dict:
    """The epoch line's read figures, summed over ranks (a collective: every rank calls it).

    Args:
        train_reads, validation_reads: this rank's ``IO_FIELDS`` counts (GETs, bytes, cache hits,
            cache misses) while training this epoch and while validating it.
        patches: the training patches this rank took this epoch.
    """
    train = [distributed.total(float(value), device) for value in train_reads]
    validation = [distributed.total(float(value), device) for value in validation_reads]
    patches = max(distributed.total(float(patches), device), 1.0)
    gets = train[0] + validation[0]
    hits, misses = train[2] + validation[2], train[3] + validation[3]
    fields = {"gets_per_patch": train[0] / patches, "mib_per_patch": train[1] / patches / MiB,
              "val_gets": int(validation[0]), "gets": int(gets), "mib": (train[1] + validation[1]) / MiB,
              "request_cost_usd": gets * price_per_1000 / 1000}
    if hits + misses:
        fields["cache_hit_fraction"] = hits / (hits + misses)
    return fields


def stored_objects(cases) -> dict:
    """``{(bucket, key): bytes}`` of the DICOM objects the ``cases`` read (their sequences and masks)."""
    objects: dict = {}
    for case in cases:
        for volume in (*case.images, case.mask):
            objects.update(_volume_objects(volume))
    return objects


def _volume_objects(volume) -> dict:
    """``{(bucket, key): bytes}`` of the objects ``volume`` reads (a series read onto another grid:
    its own series'; a SEG or structure set: its one object; a zero-filled channel: none)."""
    if volume is None:
        return {}
    source = getattr(volume, "native", volume)
    bucket = getattr(source, "bucket", "")
    sizes = getattr(source, "sizes", None) or ((source.size,) if hasattr(source, "size") else ())
    return {(bucket, key): int(size) for key, size in zip(getattr(source, "keys", ()), sizes)}


def cache_fit(cases, cache_gb: float) -> dict:
    """How the ``cases``' DICOM objects (their sequences and masks) compare with a ``cache_gb`` cache:
    ``dataset_gb``, ``cache_gb`` and ``expected_hit_fraction``, the share of a later epoch's reads
    the cache can serve at best: ``cache / dataset`` (1 when it all fits; 0 with no cache). Least
    recently used eviction under a sampler that visits every case before any again serves fewer
    (the job's bill, :mod:`brainseg.run.forecast`, replays it); the epoch lines'
    ``cache_hit_fraction`` is what it came to."""
    dataset_gb = sum(stored_objects(cases).values()) / 1e9
    fraction = 1.0 if dataset_gb <= cache_gb else max(cache_gb, 0.0) / dataset_gb
    return {"dataset_gb": round(dataset_gb, 4), "cache_gb": cache_gb, "expected_hit_fraction": round(fraction, 4)}


def cache_fit_text(fit: dict) -> str:
    """The job's start-up line on :func:`cache_fit`'s figures."""
    if fit["cache_gb"] <= 0:
        return (f"local cache off: the training cases' DICOM objects ({fit['dataset_gb']:.2f} GB) are read from S3 "
                "every epoch")
    if fit["expected_hit_fraction"] >= 1.0:
        return (f"local cache: the training cases' DICOM objects hold {fit['dataset_gb']:.2f} GB, within the "
                f"{fit['cache_gb']:g} GB cache: from the second epoch their reads are served from disk")
    need = fit["dataset_gb"] * 1.1
    return (f"local cache: the training cases' DICOM objects hold {fit['dataset_gb']:.2f} GB, more than the "
            f"{fit['cache_gb']:g} GB cache: at least {1 - fit['expected_hit_fraction']:.0%} of reads will keep missing "
            f"and cost GETs every epoch; --cache-gb {need:.0f} (and an instance volume that holds it) keeps them all")


def request_totals(history: list[dict]) -> dict:
    """The run's reads from its epoch lines: GETs and request fee in all, and the first and last
    epochs' GETs per training patch (the second shows what the local cache saves)."""
    lines = [line for line in history if "gets" in line]
    if not lines:
        return {}
    totals = {"gets": sum(line["gets"] for line in lines),
              "request_cost_usd": sum(line["request_cost_usd"] for line in lines),
              "gets_per_patch_first_epoch": lines[0]["gets_per_patch"],
              "gets_per_patch_last_epoch": lines[-1]["gets_per_patch"]}
    if "cache_hit_fraction" in lines[-1]:
        totals["cache_hit_fraction_last_epoch"] = lines[-1]["cache_hit_fraction"]
    return totals
