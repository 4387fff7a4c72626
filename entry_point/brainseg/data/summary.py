"""Case summaries: intensity statistics per sequence and tumour content, computed once per case and
cached in the index.

The patch stream normalises each channel with its sequence's statistics and centres foreground
patches on the recorded tumour coordinates, so no volume is downloaded to find tumour during
training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from brainseg.data.series import Series

STAT_SLICES = 8  # slices read per sequence to estimate intensity statistics
FOREGROUND_POINTS = 256  # tumour voxel coordinates kept per case for foreground sampling
MASK_CHUNK_SLICES = 16  # mask slices read at once when summarising (bounds memory)


@dataclass(frozen=True, slots=True)
class Intensity:
    """Intensity statistics of one sequence from ``STAT_SLICES`` evenly spaced slices: ``low`` and
    ``high`` are the 0.5 and 99.5 percentiles, ``mean`` and ``std`` are over body voxels (above
    ``low + 10%`` of the robust range). A zero-filled (missing) sequence has all zeros and std 1."""

    sequence: str
    minimum: float
    maximum: float
    low: float
    high: float
    mean: float
    std: float


@dataclass(frozen=True, slots=True)
class CaseSummary:
    """Content statistics of one case, computed once and cached in the index: each sequence's
    intensities (channel order) and, from the whole mask, the tumour and the label values present.
    Foreground points are drawn evenly over the label values, so a small class is sampled as
    often as a large one."""

    intensities: tuple  # Intensity per sequence, in channel order
    tumour_voxels: int
    tumour_ml: float
    tumour_bbox: tuple  # (z0, z1, y0, y1, x0, x1), or () when the mask is empty
    foreground_points: tuple  # ((z, y, x), ...), up to FOREGROUND_POINTS
    label_counts: tuple = ()  # ((label value, voxels), ...) of the non-zero values

    @classmethod
    def from_json(cls, data: dict) -> CaseSummary:
        fields = dict(data)
        fields["intensities"] = tuple(Intensity(**item) for item in fields["intensities"])
        fields["tumour_bbox"] = tuple(fields["tumour_bbox"])
        fields["foreground_points"] = tuple(tuple(p) for p in fields["foreground_points"])
        fields["label_counts"] = tuple(tuple(p) for p in fields["label_counts"])
        return cls(**fields)


def _stable_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def intensity_of(sequence: str, series: Series | None) -> Intensity:
    """Statistics of a few evenly spaced slices of ``series`` (zeros and std 1 for a missing one)."""
    if series is None:
        return Intensity(sequence, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    depth = series.shape[0]
    picks = sorted({int(round(z)) for z in np.linspace(0, depth - 1, min(STAT_SLICES, depth))})
    values = series.read_planes(picks).ravel()
    low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    body = values[values > low + 0.1 * (high - low)]
    if body.size < 100:
        body = values
    return Intensity(sequence, float(values.min()), float(values.max()), low, high, float(body.mean()),
                     float(max(body.std(), 1e-6)))


def summarise_case(case_id: str, images: dict[str, Series | None], mask: Series | None) -> CaseSummary:
    """Intensity statistics of each sequence (``{name: series, or None when zero-filled}``, in channel
    order) and the tumour content of the whole mask (if any)."""
    intensities = tuple(intensity_of(name, series) for name, series in images.items())
    reference = next(series for series in images.values() if series is not None)
    depth = reference.shape[0]
    rng = np.random.default_rng(_stable_seed(case_id))
    counts: dict[int, int] = {}
    bbox_low = np.full(3, np.iinfo(np.int64).max)
    bbox_high = np.full(3, -1)
    reservoirs: dict[int, list[np.ndarray]] = {}
    for z0 in range(0, depth if mask is not None else 0, MASK_CHUNK_SLICES):
        z1 = min(depth, z0 + MASK_CHUNK_SLICES)
        chunk = mask.read_region(z0, z1, 0, mask.shape[1], 0, mask.shape[2])
        points = np.argwhere(chunk > 0)
        if not points.size:
            continue
        values = chunk[tuple(points.T)].astype(np.int64)
        points[:, 0] += z0
        bbox_low = np.minimum(bbox_low, points.min(axis=0))
        bbox_high = np.maximum(bbox_high, points.max(axis=0))
        for value in np.unique(values):
            of_value = points[values == value]
            counts[int(value)] = counts.get(int(value), 0) + len(of_value)
            take = min(len(of_value), FOREGROUND_POINTS)
            reservoirs.setdefault(int(value), []).append(of_value[rng.choice(len(of_value), take, replace=False)])
    voxels = sum(counts.values())
    if reservoirs:
        quota = max(1, FOREGROUND_POINTS // len(reservoirs))
        chosen = []
        for value in sorted(reservoirs):
            pool = np.concatenate(reservoirs[value])
            chosen.append(pool[rng.choice(len(pool), min(len(pool), quota), replace=False)])
        chosen = np.concatenate(chosen)
        foreground = tuple(tuple(int(v) for v in p) for p in chosen[np.lexsort(chosen.T[::-1])])
        bbox = tuple(int(v) for pair in zip(bbox_low, bbox_high + 1) for v in pair)
    else:
        foreground, bbox = (), ()
    return CaseSummary(
        intensities=intensities, tumour_voxels=int(voxels),
        tumour_ml=float(voxels * np.prod(reference.spacing) / 1000.0), tumour_bbox=bbox,
        foreground_points=foreground, label_counts=tuple(sorted(counts.items())),
    )
