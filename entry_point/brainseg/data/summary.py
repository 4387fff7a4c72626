"""Case summaries: intensity statistics per sequence and tumour content, computed once per case and
cached in the index.

The patch stream normalises each channel with its sequence's statistics and centres foreground
patches on the recorded tumour coordinates, so no volume is downloaded to find tumour during
training. The lesions each structure of the mask holds are counted too: which postprocessing a
run may offer depends on them (a rule keeping the largest component is wrong where studies hold
several lesions).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from brainseg.data.series import Series

SUMMARY_VERSION = 3  # 2: lesion counts, the foreground points' values; 3: lesion points; another version is redone
STAT_SLICES = 8  # slices read per sequence to estimate intensity statistics
FOREGROUND_POINTS = 256  # tumour voxel coordinates kept per case for foreground sampling
MASK_CHUNK_SLICES = 16  # mask slices read at once when summarising (bounds memory)
LESION_MIN_MM3 = 50.0  # a component this small or smaller is no lesion (BraTS's scoring floor)
SUBSET_VALUES = 4  # up to this many label values in a mask, lesions are counted for every set of them
_COMPONENTS = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity, as lesions are scored


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


class Points(Sequence):
    """Voxel coordinates ``((z, y, x), ...)`` held as one int32 array (12 bytes a point) rather than
    tuples of Python ints (about 150): a case keeps hundreds, and every process of a job holds every
    case's. Reads as the tuple of tuples it replaces (indexing, iteration, equality, ``len``) and as
    an ``(n, 3)`` array (``np.asarray``)."""

    __slots__ = ("_array",)

    def __init__(self, points=()):
        array = np.array(points, dtype=np.int32).reshape(-1, 3)
        array.flags.writeable = False
        self._array = array

    def __len__(self) -> int:
        return len(self._array)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Points(self._array[index])
        return tuple(int(value) for value in self._array[index])

    def __array__(self, dtype=None, copy=None):
        return self._array.astype(dtype) if dtype is not None else self._array.copy()

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and all(
            tuple(mine) == tuple(theirs) for mine, theirs in zip(self, other))

    def __hash__(self) -> int:
        return hash(self._array.tobytes())

    def __reduce__(self):
        return Points, (self._array,)

    def __repr__(self) -> str:
        return f"Points({self._array.tolist()})"

    def tolist(self) -> list:
        return self._array.tolist()


@dataclass(frozen=True, slots=True)
class CaseSummary:
    """Content statistics of one case, computed once and cached in the index: each sequence's
    intensities (channel order) and, from the whole mask, the tumour and the label values present.
    Foreground points are drawn evenly over the label values, so a small class is sampled as
    often as a large one; each point's value is kept, so a stream can weigh them otherwise. Lesion
    points are drawn evenly over the lesions (26-connected components of the tumour over
    ``LESION_MIN_MM3``; every component when none is that large) and, within a lesion, evenly over
    its label values, so a small lesion beside a large one is sampled as often."""

    intensities: tuple  # Intensity per sequence, in channel order
    tumour_voxels: int
    tumour_ml: float
    tumour_bbox: tuple  # (z0, z1, y0, y1, x0, x1), or () when the mask is empty
    foreground_points: Points  # ((z, y, x), ...), up to FOREGROUND_POINTS
    label_counts: tuple = ()  # ((label value, voxels), ...) of the non-zero values
    lesion_counts: tuple = ()  # (((label values), lesions), ...): see lesions_of
    foreground_values: tuple = ()  # the label value of each foreground point
    lesion_points: Points = Points()  # ((z, y, x), ...), up to FOREGROUND_POINTS, evenly over the lesions

    @classmethod
    def from_json(cls, data: dict) -> CaseSummary:
        fields = dict(data)
        fields["intensities"] = tuple(Intensity(**item) for item in fields["intensities"])
        fields["tumour_bbox"] = tuple(fields["tumour_bbox"])
        fields["foreground_points"] = Points(fields["foreground_points"])
        fields["label_counts"] = tuple(tuple(p) for p in fields["label_counts"])
        fields["lesion_counts"] = tuple((tuple(values), count) for values, count in fields.get("lesion_counts", ()))
        fields["foreground_values"] = tuple(fields.get("foreground_values", ()))
        fields["lesion_points"] = Points(fields.get("lesion_points", ()))
        return cls(**fields)

    def lesions_of(self, values: frozenset | None) -> int | None:
        """How many lesions (26-connected components over 50 mm³) the voxels of label ``values``
        form (``None``: every non-zero value); ``None`` when not counted (a summary older than
        the counts, or a set of values of a mask with more than ``SUBSET_VALUES`` of them)."""
        present = {value for value, _ in self.label_counts}
        wanted = tuple(sorted(present if values is None else present & set(values)))
        if not wanted:
            return 0
        return dict(self.lesion_counts).get(wanted)


def _stable_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def intensity_of(sequence: str, series: Series | None) -> Intensity:
    """Statistics of a few evenly spaced slices of ``series`` (zeros and std 1 for a missing one); of
    its own slices when it is read through its geometry onto another grid (no zeros outside its view)."""
    if series is None:
        return Intensity(sequence, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    series = series.native
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
    tumour: list[tuple[np.ndarray, np.ndarray]] = []  # every tumour voxel and its value, to count lesions
    for z0 in range(0, depth if mask is not None else 0, MASK_CHUNK_SLICES):
        z1 = min(depth, z0 + MASK_CHUNK_SLICES)
        chunk = mask.read_region(z0, z1, 0, mask.shape[1], 0, mask.shape[2])
        points = np.argwhere(chunk > 0)
        if not points.size:
            continue
        values = chunk[tuple(points.T)].astype(np.int64)
        points[:, 0] += z0
        tumour.append((points.astype(np.int32), values))
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
        chosen, chosen_values = [], []
        for value in sorted(reservoirs):
            pool = np.concatenate(reservoirs[value])
            chosen.append(pool[rng.choice(len(pool), min(len(pool), quota), replace=False)])
            chosen_values.append(np.full(len(chosen[-1]), value))
        chosen, chosen_values = np.concatenate(chosen), np.concatenate(chosen_values)
        order = np.lexsort(chosen.T[::-1])
        foreground = Points(chosen[order])
        foreground_values = tuple(int(v) for v in chosen_values[order])
        bbox = tuple(int(v) for pair in zip(bbox_low, bbox_high + 1) for v in pair)
        box = tumour_box(tumour, bbox)
        lesion_counts = count_lesions(box, reference.spacing)
        lesion_points = points_by_lesion(box, bbox, reference.spacing, rng)
    else:
        foreground, foreground_values, bbox, lesion_counts, lesion_points = Points(), (), (), (), Points()
    return CaseSummary(
        intensities=intensities, tumour_voxels=int(voxels),
        tumour_ml=float(voxels * np.prod(reference.spacing) / 1000.0), tumour_bbox=bbox,
        foreground_points=foreground, label_counts=tuple(sorted(counts.items())),
        lesion_counts=lesion_counts, foreground_values=foreground_values, lesion_points=lesion_points,
    )


def tumour_box(tumour: list[tuple[np.ndarray, np.ndarray]], bbox: tuple) -> np.ndarray:
    """The label values of the tumour's bounding box ``bbox`` ``(z0, z1, y0, y1, x0, x1)`` from
    ``tumour``, ``[(points (N, 3), values (N,)), ...]`` inside it."""
    origin = np.asarray(bbox[0::2])
    box = np.zeros(tuple(high - low for low, high in zip(bbox[0::2], bbox[1::2])), dtype=np.int64)
    for points, values in tumour:
        box[tuple((points - origin).T)] = values
    return box


def count_lesions(labels: np.ndarray, spacing: tuple) -> tuple:
    """``(((label values), lesions), ...)``: the 26-connected components of over ``LESION_MIN_MM3``
    that the voxels of each set of values in ``labels`` (the tumour's box) form, for every non-empty
    set of the values present when there are at most ``SUBSET_VALUES`` of them, else for each value
    alone and for all together."""
    present = sorted(int(value) for value in np.unique(labels) if value)
    if len(present) <= SUBSET_VALUES:
        sets = [subset for size in range(1, len(present) + 1) for subset in itertools.combinations(present, size)]
    else:
        sets = [(value,) for value in present] + [tuple(present)]
    floor_voxels = LESION_MIN_MM3 / float(np.prod(spacing))
    counts = []
    for values in sets:
        components, count = ndimage.label(np.isin(labels, values), _COMPONENTS)
        sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
        counts.append((tuple(values), int(np.count_nonzero(sizes > floor_voxels))))
    return tuple(counts)


def points_by_lesion(box: np.ndarray, bbox: tuple, spacing: tuple, rng: np.random.Generator) -> Points:
    """Up to ``FOREGROUND_POINTS`` volume coordinates of the tumour in ``box`` (at ``bbox``), sorted:
    an even share for each lesion, and each lesion's share even over its label values (a lesion or
    value with fewer voxels than its share gives all of them, the rest going to the others)."""
    components, count = ndimage.label(box > 0, _COMPONENTS)
    sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
    lesions = np.flatnonzero(sizes > LESION_MIN_MM3 / float(np.prod(spacing))) + 1
    if not len(lesions):
        lesions = np.arange(1, count + 1)
    boxes = ndimage.find_objects(components)
    chosen = []
    for lesion, share in zip(lesions, even_shares([int(sizes[lesion - 1]) for lesion in lesions], FOREGROUND_POINTS)):
        where = boxes[lesion - 1]  # each lesion's own box, not the whole tumour's, is searched
        points = np.argwhere(components[where] == lesion) + [part.start for part in where]
        values = box[tuple(points.T)]
        groups = [points[values == value] for value in np.unique(values)]
        for group, take in zip(groups, even_shares([len(group) for group in groups], share)):
            chosen.append(group[rng.choice(len(group), take, replace=False)])
    chosen = np.concatenate(chosen) + np.asarray(bbox[0::2])
    return Points(chosen[np.lexsort(chosen.T[::-1])])


def even_shares(capacities: list[int], total: int) -> list[int]:
    """``total`` split as evenly as ``capacities`` allow (each share at most its capacity; what a
    small one cannot take goes to the others, earlier ones taking the remainder of a split)."""
    shares = [0] * len(capacities)
    left = min(total, sum(capacities))
    while left:
        open_ = [index for index, capacity in enumerate(capacities) if shares[index] < capacity]
        each, extra = divmod(left, len(open_))
        for position, index in enumerate(open_):
            take = min(capacities[index] - shares[index], each + (position < extra))
            shares[index] += take
            left -= take
    return shares
