"""Case summaries: intensity statistics and tumour content, computed once per case and cached.

The patch stream normalises with the intensity statistics and centres foreground patches on the
recorded tumour coordinates, so no volume is downloaded to find tumour during training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from brainseg.data.series import Series

STAT_SLICES = 8  # slices read per case to estimate intensity statistics
FOREGROUND_POINTS = 256  # tumour voxel coordinates kept per case for foreground sampling
MASK_CHUNK_SLICES = 16  # mask slices read at once when summarising (bounds memory)


@dataclass(frozen=True, slots=True)
class CaseSummary:
    """Content statistics of one case, computed once and cached in the index.

    Intensity statistics come from ``STAT_SLICES`` evenly spaced image slices: ``low`` and
    ``high`` are the 0.5 and 99.5 percentiles, ``mean`` and ``std`` are over body voxels
    (above ``low + 10%`` of the robust range). Tumour figures come from the whole mask.
    """

    minimum: float
    maximum: float
    low: float
    high: float
    mean: float
    std: float
    tumour_voxels: int
    tumour_ml: float
    tumour_bbox: tuple  # (z0, z1, y0, y1, x0, x1), or () when the mask is empty
    foreground_points: tuple  # ((z, y, x), ...), up to FOREGROUND_POINTS

    @classmethod
    def from_json(cls, data: dict) -> CaseSummary:
        fields = dict(data)
        fields["tumour_bbox"] = tuple(fields["tumour_bbox"])
        fields["foreground_points"] = tuple(tuple(p) for p in fields["foreground_points"])
        return cls(**fields)


def _stable_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def summarise_case(case_id: str, image: Series, mask: Series | None) -> CaseSummary:
    """Intensity statistics from a few image slices and the tumour content of the whole mask (if any)."""
    depth = image.shape[0]
    picks = sorted({int(round(z)) for z in np.linspace(0, depth - 1, min(STAT_SLICES, depth))})
    values = image.read_planes(picks).ravel()
    low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    body = values[values > low + 0.1 * (high - low)]
    if body.size < 100:
        body = values
    voxels = 0
    bbox_low = np.full(3, np.iinfo(np.int64).max)
    bbox_high = np.full(3, -1)
    rng = np.random.default_rng(_stable_seed(case_id))
    reservoir: list[np.ndarray] = []
    for z0 in range(0, depth if mask is not None else 0, MASK_CHUNK_SLICES):
        z1 = min(depth, z0 + MASK_CHUNK_SLICES)
        chunk = mask.read_region(z0, z1, 0, mask.shape[1], 0, mask.shape[2])
        points = np.argwhere(chunk > 0)
        if not points.size:
            continue
        points[:, 0] += z0
        voxels += len(points)
        bbox_low = np.minimum(bbox_low, points.min(axis=0))
        bbox_high = np.maximum(bbox_high, points.max(axis=0))
        take = min(len(points), FOREGROUND_POINTS)
        reservoir.append(points[rng.choice(len(points), take, replace=False)])
    if reservoir:
        pool = np.concatenate(reservoir)
        chosen = pool[rng.choice(len(pool), min(len(pool), FOREGROUND_POINTS), replace=False)]
        foreground = tuple(tuple(int(v) for v in p) for p in chosen[np.lexsort(chosen.T[::-1])])
        bbox = tuple(int(v) for pair in zip(bbox_low, bbox_high + 1) for v in pair)
    else:
        foreground, bbox = (), ()
    return CaseSummary(
        minimum=float(values.min()), maximum=float(values.max()), low=low, high=high,
        mean=float(body.mean()), std=float(max(body.std(), 1e-6)),
        tumour_voxels=int(voxels), tumour_ml=float(voxels * np.prod(image.spacing) / 1000.0),
        tumour_bbox=bbox, foreground_points=foreground,
    )
