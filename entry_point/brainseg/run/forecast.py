"""What a run will read from S3, before it reads: every slab of the run, planned from the catalog
exactly as the patch stream plans them (the sampler is a pure function of the seed, the slab
number and the index), read ahead as the stream's shards read them (a wave of slabs in flight
together, none seeing what another fetches; the slabs read past the last step), and every
epoch's validation volumes, each read's byte ranges replayed through a model of the host's cache
(:mod:`brainseg.io.cache`: aligned blocks, a run of missing blocks of one object fetched by one
GET, least recently used blocks evicted down to nine tenths of the bound) to count the GETs and
bytes of each epoch.

A wave's reads are counted in the epoch of the samples cut while they land (a sample carries the
reads its worker made since the last one), taken as the middle of the group cut meanwhile: how far
the workers run ahead of the trainer moves reads between the first epoch and the second, not the
run's total. What it leaves out: two shards fetching one block at the same moment outside a wave,
when the real cache evicts (it looks at its folder after writing a sixteenth of its bound, and a
hit marks a block used at most once a minute), and the test evaluation after the last epoch. A
sequence read through another grid's geometry counts its whole source series at its first read
(its tiles are resampled from boxes the forecast does not trace, then kept in the cache).
"""

from __future__ import annotations

import itertools
import math
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from brainseg.bill import Bill, bill, patch_rate
from brainseg.config import Hyperparameters
from brainseg.data.catalog import Case
from brainseg.data.resample import TargetSpacing
from brainseg.data.stream import PatchStream
from brainseg.environment import Environment
from brainseg.io import cache
from brainseg.io.cache import BLOCK_BYTES, EVICT_TO, RangeCache, block_runs, blocks_of
from brainseg.run.cases import case_splits, load_catalog, resolve_target_spacing, select_cases
from brainseg.run.requests import stored_objects
from brainseg.stream_config import MiB, StreamConfig
from brainseg.tasks import task_of


class CacheModel:
    """The host's cache as far as GETs and bytes go: which blocks it holds (``max_bytes`` 0: no
    cache, every range is a GET of its own), starting from the ``start_bytes`` of blocks that
    ``holds`` says are there already (a job's catalog step cached them while summarising new
    cases): they are the oldest, so the first to go when the cache evicts. Reads inside
    :meth:`wave` run together: none sees the blocks another fetches, so both fetch them."""

    def __init__(self, max_bytes: int, sizes: dict, holds: Callable[[tuple], bool] | None = None,
                 start_bytes: int = 0):
        self.max_bytes = int(max_bytes)
        self.sizes = sizes  # (bucket, key) -> object bytes: the last block of an object is short
        self.holds = holds
        self.blocks: OrderedDict[tuple, int] = OrderedDict()
        self.seen: set[tuple] = set()  # blocks asked about once: ``holds`` answers for each only then
        self.fetching: dict[tuple, int] = {}  # fetched by the reads of this wave, held when it ends
        self.together = False
        self.unseen = int(start_bytes) if holds is not None else 0  # held from the start, not yet asked about
        self.held = self.unseen

    def read(self, requests: list[tuple]) -> tuple[int, int]:
        """``(GETs, bytes)`` that reading ``requests`` (one read's ranges) costs."""
        if not requests:
            return 0, 0
        if self.max_bytes <= 0:
            return len(requests), sum(stop - start for _, _, start, stop, _ in requests)
        wanted = dict.fromkeys(block for request in requests for block in blocks_of(request))
        for block in wanted:
            if block not in self.seen:
                self.seen.add(block)
                # held from the start (while evictions left some of those), so among the oldest
                if self.unseen > 0 and self.holds(block):
                    self.blocks[block] = self._length(block)
                    self.unseen -= self.blocks[block]
                    self.blocks.move_to_end(block, last=False)
        missing = [block for block in wanted if block not in self.blocks]
        for block in wanted:
            if block in self.blocks:
                self.blocks.move_to_end(block)
        fetched = 0
        for block in missing:
            fetched += self.fetching.setdefault(block, self._length(block))
        if not self.together:
            self._hold()
        return len(block_runs(missing)), fetched

    @contextmanager
    def wave(self):
        """Reads in flight together (a stream's read-ahead): they share no fetched block."""
        self.together = True
        try:
            yield self
        finally:
            self.together = False
            self._hold()

    def _hold(self) -> None:
        """Hold what the reads fetched; past the bound, evict down to nine tenths of it."""
        for block, length in self.fetching.items():
            if block not in self.blocks:
                self.blocks[block] = length
                self.held += length
        self.fetching.clear()
        if self.held > self.max_bytes:
            self._evict()

    def _evict(self) -> None:
        """The least recently used blocks out, down to nine tenths of the bound: first the bytes
        held from the start that no read asked about yet (which of those blocks go is not known)."""
        target = EVICT_TO * self.max_bytes
        dropped = min(self.unseen, max(0, self.held - target))
        self.held -= dropped
        self.unseen -= dropped
        while self.blocks and self.held > target:
            self.held -= self.blocks.popitem(last=False)[1]

    def _length(self, block: tuple) -> int:
        size = self.sizes.get(block[:2], (block[3] + 1) * BLOCK_BYTES)
        return max(0, min(BLOCK_BYTES, size - block[3] * BLOCK_BYTES))


def waves(total: int, shards: int, capacity: int, group: int) -> Iterator[tuple[int, list[int]]]:
    """Slab numbers below ``total`` in the sets read together, each with the first slab of the
    groups the shards cut into patches meanwhile (the samples that carry the reads' counts): each of
    ``shards`` shards (workers of every rank) reads its first ``group`` slabs alone, then up to
    ``capacity`` in flight while it cuts that group, then ``group`` more as it starts cutting each
    next group (:meth:`PatchStream.__iter__`)."""
    low = 0
    bounds = itertools.chain([(group, 0), (capacity, 0)], ((capacity + cut * group, cut) for cut in itertools.count(1)))
    for high, cut in bounds:
        if high <= low:
            continue
        wave = [shard + local * shards for local in range(low, high) for shard in range(shards)]
        wave = sorted(number for number in wave if number < total)
        if not wave:
            return
        yield cut * group * shards, wave
        low = high


def _case_reads(case: Case, region: tuple | None, with_mask: bool) -> list[list[tuple]]:
    """The ranges of each of ``case``'s reads of ``region`` (``None``: whole volumes), one list per
    sequence and the mask, as :func:`brainseg.data.stream.read_case_region` reads them."""
    volumes = [*case.images, case.mask if with_mask else None]
    return [volume.requests(volume.whole if region is None else region) for volume in volumes if volume is not None]


REPLAYED_CASES = 128  # a run over more training cases is replayed on an even sample of this many


def forecast_reads(train: list[Case], val: list[Case], config: StreamConfig, target: TargetSpacing, *,
                   epochs: int, patches_per_epoch: int, cache_bytes: int, workers: int = 1, world: int = 1,
                   masks_scored: bool = True, in_memory: bool = False, start: RangeCache | None = None
                   ) -> tuple[list[int], list[int]]:
    """GETs and bytes of each of ``epochs`` epochs: ``patches_per_epoch`` training patches (all ranks)
    cut from the slabs that ``workers`` DataLoader workers (0: the process itself) of each of
    ``world`` ranks read ahead (``in_memory``: the training volumes read whole once, before the
    first step), then the ``val`` cases read whole (their masks when ``masks_scored``), through a
    cache of ``cache_bytes`` (0: none) that starts with what the host cache ``start`` holds (none: empty).

    Over more than :data:`REPLAYED_CASES` training cases, the run is replayed on an even sample of
    that many, its patches, validation cases, cache and shards scaled by the same fraction, and
    its GETs and bytes scaled back (a case's slabs come from a permutation of the cases, so each
    case is read as often whatever their number): seconds rather than minutes at BraTS's size."""
    fraction = min(1.0, REPLAYED_CASES / len(train))
    if fraction < 1.0:
        train = [train[int(index / fraction)] for index in range(REPLAYED_CASES)]
        val = [val[int(index / fraction)] for index in range(round(len(val) * fraction))]
    shards = max(1, round(max(1, workers) * world * fraction))
    gets, read = _replay(train, val, config, target, epochs=epochs, patches_per_epoch=patches_per_epoch * fraction,
                         cache_bytes=int(cache_bytes * fraction), shards=shards, workers=workers,
                         masks_scored=masks_scored, in_memory=in_memory, holds=start.holds if start else None,
                         start_bytes=int(start.size_bytes() * fraction) if start else 0)
    return [round(value / fraction) for value in gets], [round(value / fraction) for value in read]


def _replay(train: list[Case], val: list[Case], config: StreamConfig, target: TargetSpacing, *, epochs: int,
            patches_per_epoch: float, cache_bytes: int, shards: int, workers: int, masks_scored: bool,
            in_memory: bool, holds: Callable[[tuple], bool] | None, start_bytes: int) -> tuple[list[int], list[int]]:
    """:func:`forecast_reads` on these cases, ``shards`` stream shards of ``workers`` per process."""
    stream = PatchStream(train, config, target=target)
    sizes = stored_objects((*train, *val))
    model = CacheModel(cache_bytes, sizes, holds, start_bytes)
    # a cache that holds every object never evicts: once the validation volumes were read they cost
    # nothing again, and they need not be traced every epoch
    holds_all = 0 < sum(sizes.values()) <= EVICT_TO * cache_bytes
    slabs_per_epoch = math.ceil(patches_per_epoch / config.patches_per_slab)
    gets, read = [0] * epochs, [0] * epochs

    def count(epoch: int, costs: list[tuple[int, int]]) -> None:
        gets[epoch] += sum(cost[0] for cost in costs)
        read[epoch] += sum(cost[1] for cost in costs)

    validation = [requests for case in val for requests in _case_reads(case, None, masks_scored)]  # every epoch's

    def validate(epoch: int) -> None:
        if epoch == 0 or not holds_all:
            count(epoch, [model.read(requests) for requests in validation])

    validated = 0  # epochs whose validation reads are counted
    capacity = stream.capacity(max(1, workers))
    group = min(config.mix_slabs, capacity)
    # each shard has read capacity - group slabs past the last group it cut when the run ends
    slabs = 0 if in_memory else epochs * slabs_per_epoch + shards * (capacity - group)
    if in_memory:
        count(0, [model.read(requests) for case in train for requests in _case_reads(case, None, True)])
    for cut, wave in waves(slabs, shards, capacity, group):
        # the epoch whose samples count the wave's reads, those of the groups cut while it is read
        # (it ends about when half of them are given); the validations of the epochs before it ran
        # after those epochs' samples, so after the reads those samples count
        current = min(int((cut + group * shards / 2) // slabs_per_epoch), epochs - 1)
        for epoch in range(validated, current):
            validate(epoch)
        validated = max(validated, current)
        with model.wave():
            for number in wave:
                plan = stream.plan(number)
                count(current, [model.read(requests) for requests in
                                _case_reads(train[plan.case_index], stream.native_region(plan), True)])
    for epoch in range(validated, epochs):
        validate(epoch)
    return gets, read


def forecast_bill(hp: Hyperparameters, train: list[Case], val: list[Case], target: TargetSpacing, *, world: int,
                  instance_type: str, instance_count: int, volume_gb: int, cache_bytes: int,
                  start: RangeCache | None = None) -> Bill:
    """The run's bill before it starts: its steps at the rate table's (or ``--patches-per-s``) rate,
    and its reads (:func:`forecast_reads`) through a cache of ``cache_bytes`` holding what ``start`` holds."""
    patches_per_step = hp.batch_size * world
    gets, read = forecast_reads(train, val, hp.stream_config(), target, epochs=hp.epochs,
                                patches_per_epoch=hp.steps_per_epoch * patches_per_step, cache_bytes=cache_bytes,
                                workers=hp.num_workers, world=world, masks_scored=task_of(hp).needs_masks,
                                in_memory=hp.data_source == "memory", start=start)
    if hp.patches_per_s:
        rate, source = hp.patches_per_s, "--patches-per-s"
    else:
        rate, source = patch_rate(instance_type, (len(hp.sequence_names), *hp.patch_size), instance_count)
    return bill(steps=hp.epochs * hp.steps_per_epoch, patches_per_step=patches_per_step, patches_per_s=rate,
                rate_source=source, instance_type=instance_type, instance_count=instance_count, epoch_gets=gets,
                epoch_bytes=read, get_usd_per_1000=hp.get_price_per_1000, volume_gb=volume_gb,
                usd_per_hour=hp.instance_usd_per_hour or None)


def actual_bill(hp: Hyperparameters, history: list[dict], steps: int, *, world: int, instance_type: str,
                instance_count: int, volume_gb: int) -> Bill:
    """What the run cost by :func:`forecast_bill`'s formula: its steps, its measured training
    time and patch rate, and its epoch lines' GETs and bytes."""
    lines = [line for line in history if "gets" in line]
    seconds = sum(line["seconds"] for line in history)
    rate = sum(line["patches_per_s"] for line in history) / len(history) if history else None
    return bill(steps=steps, patches_per_step=hp.batch_size * world, patches_per_s=rate, rate_source="measured",
                instance_type=instance_type, instance_count=instance_count,
                epoch_gets=[line["gets"] for line in lines], epoch_bytes=[round(line["mib"] * MiB) for line in lines],
                get_usd_per_1000=hp.get_price_per_1000, volume_gb=volume_gb,
                usd_per_hour=hp.instance_usd_per_hour or None, hours=seconds / 3600)


def plan_bill(hp: Hyperparameters, *, world: int, instance_type: str, instance_count: int, volume_gb: int) -> Bill:
    """:func:`forecast_bill` for a job not started yet (the launcher's dry run): the catalog read as
    the job will read it (indexing the headers when no index is saved; the job then reuses it)."""
    catalog = load_catalog(hp)
    train, val, _ = select_cases(hp, catalog, case_splits(hp, catalog))
    target = resolve_target_spacing(hp, train)
    cache_bytes = int(hp.cache_gb * 1e9)
    return forecast_bill(hp, train, val, target, world=world, instance_type=instance_type,
                         instance_count=instance_count, volume_gb=volume_gb, cache_bytes=cache_bytes)


def this_job(env: Environment, world: int) -> dict:
    """The running job's ``world``, ``instance_type``, ``instance_count`` and ``volume_gb`` as the
    bill takes them: on SageMaker, its instances and the size of the volume the host cache is on;
    in process mode, this machine (no type, no volume)."""
    active = cache.active()
    volume_gb = round(shutil.disk_usage(active.directory).total / 1e9) if env.instance_type and active else 0
    return {"world": world, "instance_type": env.instance_type, "instance_count": len(env.hosts),
            "volume_gb": volume_gb}
