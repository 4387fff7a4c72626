"""Where patches come from: a pure function from (seed, slab number) to a slab and its patches.

A *slab* is one read: a region of one case, full width, a little deeper and taller than a
patch, from which ``patches_per_slab`` patches are cut. Slabs are numbered 0, 1, 2, ...; shards
(DataLoader workers and distributed ranks) take disjoint residues of that sequence, so no work is
duplicated and a run resumes from a slab number alone. Foreground slabs centre their patches on
tumour voxels recorded in the index; exactly ``foreground_fraction`` of slabs are foreground.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from brainseg.stream_config import StreamConfig


@dataclass(frozen=True)
class SlabPlan:
    """Slab ``number``: read ``region`` of case ``case_index``, cut patches at ``origins``.

    ``region`` is ``(z0, z1, y0, y1, x0, x1)``; origins are absolute ``(z, y, x)`` and each patch
    spans ``patch_extent`` voxels inside the region.
    """

    number: int
    case_index: int
    region: tuple
    origins: tuple
    patch_extent: tuple
    foreground: bool


def patch_extent(shape: tuple, patch_size: tuple) -> tuple:
    """The patch size clamped to the volume; the stream pads it back to ``patch_size``."""
    return tuple(min(int(s), int(p)) for s, p in zip(shape, patch_size))


def slab_shape(shape: tuple, config: StreamConfig) -> tuple:
    """``(D, H, W)`` of a slab: the clamped patch plus the margin in D and H, and the full width."""
    extent = patch_extent(shape, config.patch_size)
    return (min(shape[0], extent[0] + config.slab_margin[0]),
            min(shape[1], extent[1] + config.slab_margin[1]),
            shape[2])


def is_foreground_slab(slab_number: int, fraction: float) -> bool:
    """Exactly ``fraction`` of any run of consecutive slabs are foreground (no randomness)."""
    return math.floor((slab_number + 1) * fraction + 1e-9) > math.floor(slab_number * fraction + 1e-9)


def case_for_slab(slab_number: int, num_cases: int, seed: int) -> int:
    """Cases are visited in a fresh seeded permutation every ``num_cases`` slabs."""
    permutation = np.random.default_rng([seed, slab_number // num_cases, 7]).permutation(num_cases)
    return int(permutation[slab_number % num_cases])


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(int(value), high))


def plan_slab(slab_number: int, shapes: list[tuple], foregrounds: list[tuple], config: StreamConfig,
              attempt: int = 0) -> SlabPlan:
    """The slab and patch origins of ``slab_number``.

    Args:
        slab_number: the slab's place in the run's sequence (>= 0).
        shapes: ``(D, H, W)`` of each case.
        foregrounds: tumour voxel coordinates ``((z, y, x), ...)`` of each case (may be empty).
        config: patch size, margins, patches per slab, foreground fraction and seed.
        attempt: 0 for the slab's own plan; 1, 2, ... for the replacements drawn, in this fixed
            order, when the slab of an earlier attempt could not be decoded (a damaged frame), so a
            slab's patches still depend only on the seed, its number and the data.
    """
    if attempt:
        case_index = int(np.random.default_rng([config.seed, slab_number, attempt, 13]).integers(len(shapes)))
        rng = np.random.default_rng([config.seed, slab_number, attempt])
    else:
        case_index = case_for_slab(slab_number, len(shapes), config.seed)
        rng = np.random.default_rng([config.seed, slab_number])
    shape = tuple(shapes[case_index])
    extent = patch_extent(shape, config.patch_size)
    slab = slab_shape(shape, config)
    points = np.asarray(foregrounds[case_index], dtype=np.int64).reshape(-1, 3)
    foreground = is_foreground_slab(slab_number, config.foreground_fraction) and len(points) > 0

    if foreground:
        centre = points[rng.integers(len(points))]
        start = [_clamp(centre[a] - slab[a] // 2 + rng.integers(-(slab[a] - extent[a]) // 2,
                                                                  (slab[a] - extent[a]) // 2 + 1),
                        0, shape[a] - slab[a]) for a in range(2)]
    else:
        start = [int(rng.integers(0, shape[a] - slab[a] + 1)) for a in range(2)]
    region = (start[0], start[0] + slab[0], start[1], start[1] + slab[1], 0, shape[2])

    inside = points[(points[:, 0] >= region[0]) & (points[:, 0] < region[1])
                    & (points[:, 1] >= region[2]) & (points[:, 1] < region[3])] if foreground else points[:0]
    origins = []
    for _ in range(config.patches_per_slab):
        if len(inside):
            centre = inside[rng.integers(len(inside))]
            origin = [_clamp(centre[a] - extent[a] // 2, region[2 * a], region[2 * a + 1] - extent[a])
                      for a in range(3)]
        else:
            origin = [int(rng.integers(region[2 * a], region[2 * a + 1] - extent[a] + 1)) for a in range(3)]
        origins.append(tuple(int(v) for v in origin))
    return SlabPlan(slab_number, case_index, region, tuple(origins), extent, foreground)
