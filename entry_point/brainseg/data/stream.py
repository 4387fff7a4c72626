"""The patch stream: a torch ``IterableDataset`` of 3D patches read from S3 by byte ranges.

Each shard (one DataLoader worker of one distributed rank) walks its residue of the slab
sequence (see :mod:`brainseg.data.sampling`). A small thread pool reads the next slabs
while the consumer cuts, normalises and augments patches from the current ones; how many slabs
may be in flight follows from the memory budget. Patches of ``mix_slabs`` consecutive slabs are
interleaved, so a batch mixes cases.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, deque
from collections.abc import Iterator
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed
from torch.utils.data import IterableDataset, get_worker_info

from brainseg.data.augment import draw
from brainseg.data.catalog import Case
from brainseg.data.resample import NATIVE, Grid, TargetSpacing
from brainseg.data.sampling import SlabPlan, plan_slab, slab_shape
from brainseg.data.transforms import normalize, pad_to
from brainseg.dicom import PixelDataError
from brainseg.io.cache import io_counters
from brainseg.stream_config import FLOAT_BYTES, StreamConfig, check_budget

logger = logging.getLogger(__name__)

REPLACEMENT_ATTEMPTS = 8  # slabs tried in place of one whose pixels cannot be decoded
FOREGROUND_STREAM = 19  # the key of the generator that redraws foreground centres (foreground_sampling voxels)


def slab_cost_bytes(case: Case, config: StreamConfig, target: TargetSpacing = NATIVE) -> int:
    """Upper bound of the memory one slab of ``case`` holds: every channel's and the mask's native
    slab raw and decoded, their resampled copies on the ``target`` grid, plus its patches."""
    grid = target.grid_of(case)
    mask_bytes = case.mask.bytes_per_voxel if case.mask is not None else 1
    # per voxel and channel on average (a sequence read through its geometry reads more source voxels)
    present = [series.bytes_per_voxel for series in case.images if series is not None]
    image_bytes = -(-sum(present) // len(present))
    slab = slab_shape(grid.shape, config)
    resampled = 0 if grid.identity else int(np.prod(slab)) * (case.channels + 1) * FLOAT_BYTES
    return config.slab_bytes(grid.native_slab_shape(slab), image_bytes, mask_bytes, case.channels) + resampled


def _read_or_zeros(series, region: tuple) -> np.ndarray:
    """``series.read_region(*region)``, or zeros for a missing (zero-filled) sequence or mask."""
    if series is None:
        z0, z1, y0, y1, x0, x1 = region
        return np.zeros((z1 - z0, y1 - y0, x1 - x0), dtype=np.float32)
    return series.read_region(*region)


def read_case_region(case: Case, region: tuple, submit=None, grid: Grid | None = None,
                     with_mask: bool = True) -> tuple[list, object]:
    """Every channel's and the mask's voxels of ``region``: lists of futures when ``submit`` (an
    executor's) is given, so the sequences are read concurrently, else of arrays. With a ``grid``,
    ``region`` is on its target grid: the native region covering it is read and resampled. Without
    ``with_mask`` the mask is not read (``None``)."""
    native = grid.native_region(region) if grid is not None else region

    def read(series, labels: bool) -> np.ndarray:
        data = _read_or_zeros(series, native)
        return grid.to_target(data, native, region, labels) if grid is not None else data

    if submit is None:
        return [read(series, False) for series in case.images], read(case.mask, True) if with_mask else None
    return ([submit(read, series, False) for series in case.images],
            submit(read, case.mask, True) if with_mask else None)


def foreground_centres(summary, config: StreamConfig, case_id: str) -> tuple:
    """The case's foreground points a patch may be centred on, as ``config.foreground_sampling`` draws
    them: ``labels``, the summary's points (evenly over the label values); ``voxels``, as many
    drawn from them, seeded by the run's seed and the case, each value's points weighted by the
    voxels that value holds, so a centre falls on a value as often as the tumour is made of it;
    ``lesions``, the summary's lesion points (evenly over the lesions)."""
    points, values = summary.foreground_points, summary.foreground_values
    if config.foreground_sampling == "lesions" and points and not summary.lesion_points:
        raise ValueError(f"case {case_id}: its summary has no lesion points (computed before they were kept); "
                         "pass --refresh-index to summarise it again")
    if config.foreground_sampling == "lesions":
        return summary.lesion_points
    if config.foreground_sampling == "labels" or not points:
        return points
    if len(values) != len(points):
        raise ValueError(f"case {case_id}: its summary has no label value per foreground point (computed before "
                         "they were kept); pass --refresh-index to summarise it again")
    voxels, drawn = dict(summary.label_counts), Counter(values)
    weights = np.asarray([voxels.get(value, 0) / drawn[value] for value in values], dtype=float)
    if weights.sum() <= 0:
        return points
    rng = np.random.default_rng([config.seed, FOREGROUND_STREAM, _case_key(case_id)])
    picks = np.sort(rng.choice(len(points), size=len(points), p=weights / weights.sum()))
    return tuple(points[index] for index in picks)


def _case_key(case_id: str) -> int:
    return int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:8], "little")


class PatchStream(IterableDataset):
    """Endless stream of ``{"image", "label", "case_id", "slab", "origin", "io"[, "augment"]}`` samples.

    ``image`` is float32 ``(C, D, H, W)``, one channel per sequence, each normalised with its own
    statistics; ``label`` is uint8 ``(1, D, H, W)``, the mask's label values (all 0 for a case
    without a mask; the objective maps them to its targets); ``origin`` is the patch's ``(z, y, x)`` in
    the volume; ``augment`` (when augmenting) the patch's draws for
    :func:`~brainseg.data.augment.augment_batch`, which the trainer applies on its device; ``io`` the reads (:data:`~brainseg.io.cache.IO_FIELDS`) this
    worker made since its previous sample, so a batch's sum over samples counts the workers' reads.

    Args:
        cases: usable cases, e.g. ``catalog.split("train")``.
        config: sampling, normalisation, augmentation and memory settings.
        start_batch, batch_size: resume position. The stream continues exactly as if
            ``start_batch`` batches of ``batch_size`` samples had already been taken from a
            ``DataLoader`` with the same number of workers (worker roles are rotated so the
            loader's round-robin picks up where the interrupted one stopped).
        rank, world_size: this process's place among the training processes (the caller reads
            it from torch.distributed; one process by default).
        target: the spacing patches are cut at (the run's; each case's own by default).
    """

    def __init__(self, cases: list[Case], config: StreamConfig, start_batch: int = 0, batch_size: int = 1,
                 rank: int = 0, world_size: int = 1, target: TargetSpacing = NATIVE):
        super().__init__()
        if not cases:
            raise ValueError("no usable training cases: every case was excluded or the split is empty; "
                             "run `brainseg-inspect <data-uri>` to see why")
        if start_batch < 0 or batch_size < 1:
            raise ValueError(f"start_batch {start_batch}, batch_size {batch_size}: expected >= 0 and >= 1")
        self.cases = list(cases)
        self.config = config
        self.start_batch = start_batch
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        self._unreadable: set[str] = set()  # cases warned about, per worker
        self._grids = [target.grid_of(case) for case in self.cases]
        self._shapes = [grid.shape for grid in self._grids]
        self._foregrounds = [grid.points_to_target(foreground_centres(case.summary, config, case.case_id))
                             for grid, case in zip(self._grids, self.cases)]
        self.slab_cost = max(slab_cost_bytes(case, config, target) for case in self.cases)
        check_budget(config.memory_budget_bytes, 1, self.slab_cost)

    def plan(self, slab_number: int, attempt: int = 0) -> SlabPlan:
        return plan_slab(slab_number, self._shapes, self._foregrounds, self.config, attempt)

    def native_region(self, plan: SlabPlan) -> tuple:
        """The region of ``plan``'s case that its slab is read from, on the case's own grid."""
        return self._grids[plan.case_index].native_region(plan.region)

    def _settle(self, plan: SlabPlan, images: list[Future], mask: Future) -> tuple[SlabPlan, list, np.ndarray]:
        """The slab of ``plan``, or, when its pixels cannot be decoded (a damaged compressed frame
        the index could not see), the slab's next replacement plan in a fixed order."""
        try:
            return plan, [image.result() for image in images], mask.result()
        except PixelDataError as err:
            failure = err
        for attempt in range(1, REPLACEMENT_ATTEMPTS + 1):
            self._warn_unreadable(self.cases[plan.case_index].case_id, failure)
            plan = self.plan(plan.number, attempt)
            try:
                return (plan, *read_case_region(self.cases[plan.case_index], plan.region,
                                                grid=self._grids[plan.case_index]))
            except PixelDataError as err:
                failure = err
        raise PixelDataError(f"slab {plan.number}: {REPLACEMENT_ATTEMPTS + 1} slabs in a row cannot be decoded; last: "
                             f"{failure}")

    def _warn_unreadable(self, case_id: str, err: Exception) -> None:
        if case_id not in self._unreadable:
            self._unreadable.add(case_id)
            logger.warning("case %s: a slab cannot be decoded (%s); its slabs are replaced by others", case_id, err)

    def shard(self) -> tuple[int, int, int, int]:
        """``(shard index, shard count, workers in this process group, samples to skip)``.

        A DataLoader takes batch ``i`` from worker ``i % workers``. After ``start_batch``
        batches, worker ``w`` therefore plays the role of worker ``(w + start_batch) % workers``
        of the uninterrupted run, which had already delivered ``(start_batch + w) // workers``
        batches of that shard.
        """
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        role = (worker_id + self.start_batch) % workers
        skip = (self.start_batch + worker_id) // workers * self.batch_size
        return self.rank * workers + role, self.world_size * workers, workers, skip

    def capacity(self, workers: int) -> int:
        """Slabs one worker may hold at once (being cut plus read ahead), within its budget share."""
        fits = check_budget(self.config.memory_budget_bytes, workers, self.slab_cost)
        return min(self.config.read_ahead + self.config.mix_slabs, fits)

    def __iter__(self) -> Iterator[dict]:
        shard, shards, workers, skip = self.shard()
        capacity = self.capacity(workers)
        group = min(self.config.mix_slabs, capacity)
        group_patches = group * self.config.patches_per_slab
        first_group, skip = divmod(skip, group_patches)
        slabs = iter(range(shard + first_group * group * shards, 2**62, shards))
        channels = max(case.channels for case in self.cases)
        counted = io_counters()
        with ThreadPoolExecutor((channels + 1) * capacity, thread_name_prefix="slab") as pool:
            pending: deque[tuple[SlabPlan, list[Future], Future]] = deque()

            def read_ahead(limit: int) -> None:
                while len(pending) < limit:
                    plan = self.plan(next(slabs))
                    pending.append((plan, *read_case_region(self.cases[plan.case_index], plan.region, pool.submit,
                                                            self._grids[plan.case_index])))

            # The first group is fetched alone: read-ahead submitted with it would share the
            # range pool and delay the first batch.
            read_ahead(group)
            for _plan, images, mask in pending:
                futures.wait([*images, mask])
            while True:
                read_ahead(capacity)
                ready = [pending.popleft() for _ in range(group)]
                read_ahead(capacity - group)  # keep reading while this group is cut into patches
                samples = [self._patches(*self._settle(*slab)) for slab in ready]
                del ready
                for index in range(self.config.patches_per_slab):
                    for patches in samples:
                        if skip:
                            skip -= 1
                        else:  # the reads since the last sample this worker gave (their sum is exact)
                            now = io_counters()
                            yield {**patches[index], "io": torch.tensor([b - a for a, b in zip(counted, now)])}
                            counted = now

    def _patches(self, plan: SlabPlan, images: list[np.ndarray], mask: np.ndarray) -> list[dict]:
        case = self.cases[plan.case_index]
        image = np.empty((len(images), *images[0].shape), dtype=np.float32)
        for index, (channel, stats) in enumerate(zip(images, case.summary.intensities)):
            normalize(channel, self.config.normalization, stats, out=image[index])
        label = mask.astype(np.uint8)
        z0, _, y0, _, x0, _ = plan.region
        out = []
        for number, origin in enumerate(plan.origins):
            window = tuple(slice(o - r, o - r + e) for o, r, e in zip(origin, (z0, y0, x0), plan.patch_extent))
            patch_image = pad_to(image[(slice(None), *window)], (len(images), *self.config.patch_size))
            patch_label = pad_to(label[window], self.config.patch_size)
            sample = {
                "image": torch.from_numpy(np.ascontiguousarray(patch_image)),
                "label": torch.from_numpy(np.ascontiguousarray(patch_label)[None]),
                "case_id": case.case_id,
                "slab": plan.number,
                "origin": torch.tensor(origin, dtype=torch.int64),
            }
            if self.config.augment:  # drawn here, applied to the batch on the training device
                rng = np.random.default_rng([self.config.seed, plan.number, number, 1])
                square = patch_label.shape[1] == patch_label.shape[2]
                sample["augment"] = torch.from_numpy(draw(rng, len(images), square, self.config.sequence_dropout,
                                                             self.config.sequence_dropout_channels))
            out.append(sample)
        return out
