"""What a run's S3 reads cost: GETs, bytes and cache hits per epoch, and the request fee they add up
to at ``--get-price-per-1000`` (the epoch line's fields and the summary's ``s3_requests``)."""

from __future__ import annotations

import torch

from brainseg.config import MiB
from brainseg.run import distributed


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
              "val_gets": int(validation[0]), "gets": int(gets), "request_cost_usd": gets * price_per_1000 / 1000}
    if hits + misses:
        fields["cache_hit_fraction"] = hits / (hits + misses)
    return fields


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
