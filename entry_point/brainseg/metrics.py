"""Per-structure scores of a case: Dice and IoU from :class:`brainseg.overlap.Overlap`, the
95th-percentile Hausdorff distance in mm (MONAI's), and BraTS's lesion-wise Dice and HD95.

HD95 is 0 mm when both prediction and truth are empty, and the volume's diagonal in mm when exactly
one of them is (a missed or invented structure is the worst boundary error, as the BraTS ranking
counts it).

Lesion-wise, as the BraTS 2023 evaluation scores gliomas:

Per region (e.g. WT, TC, ET), the true lesions are the 26-connected components of the truth, where
components that fall inside one component of the truth dilated by 3 iterations of the 18-connected
cross (``generate_binary_structure(3, 2)``) count as one lesion. A predicted 26-connected component
belongs to a lesion when it touches the lesion dilated the same way; the lesion is scored against
the union of its components (Dice, and HD95 in mm: 374 when none was found). Lesions of at most
50 mm³ are left out of the score (50 voxels at BraTS's 1 mm spacing; their components are still
no false positives). Every predicted component that belongs to no lesion is a false positive,
scoring Dice 0 and HD95 374. A region's figure is the sum over scored lesions and false positives
divided by their number; with neither it is Dice 1, HD95 0.

The rules follow the challenge's published code (``rachitsaluja/BraTS-2023-Metrics``, glioma
parameters); HD95 of a lesion is :func:`hausdorff95` (MONAI's),
where the challenge uses DeepMind's surface-distance package. Work is done inside each lesion's
bounding box, so a lesion costs what its neighbourhood costs, not the whole volume.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance
from scipy import ndimage

from brainseg.detection import SliceCounts
from brainseg.overlap import LesionMatch, Overlap


def hausdorff95(prediction: np.ndarray, truth: np.ndarray, spacing: tuple) -> float:
    """The 95th-percentile symmetric surface distance in mm between two boolean volumes."""
    found, present = bool(prediction.any()), bool(truth.any())
    if not found and not present:
        return 0.0
    if found != present:
        return float(np.linalg.norm(np.multiply(prediction.shape, spacing)))
    as_tensor = lambda volume: torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    with warnings.catch_warnings():  # MONAI 1.6 warns about an argument its own metric passes
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        distance = compute_hausdorff_distance(as_tensor(prediction), as_tensor(truth), include_background=True,
                                              percentile=95, spacing=[float(v) for v in spacing])
    return float(distance.item())


DILATION_ITERATIONS = 3  # BraTS-GLI (BraTS-MET and -MEN use 1)
MIN_LESION_MM3 = 50.0  # true lesions this small or smaller are not scored
MISSED_HD95 = 374.0  # mm: a missed lesion's and a false positive's HD95
_COMPONENTS = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity
_DILATION = ndimage.generate_binary_structure(3, 2)  # the 18-connected cross the challenge dilates with


@dataclass(frozen=True)
class LesionWise:
    """One region's lesion-wise figures: the scores, the scored true lesions and the false positives."""

    dice: float
    hd95: float
    lesions: int
    false_positives: int

    def to_dict(self) -> dict:
        return asdict(self)


def _box(slices: tuple, shape: tuple, margin: int) -> tuple:
    return tuple(slice(max(0, s.start - margin), min(n, s.stop + margin)) for s, n in zip(slices, shape))


def lesion_wise(prediction: np.ndarray, truth: np.ndarray, spacing: tuple) -> LesionWise:
    """The lesion-wise Dice and HD95 of one region's boolean ``prediction`` against ``truth``
    (same ``(D, H, W)`` shape, voxel ``spacing`` in mm)."""
    return lesion_scores(prediction, truth, spacing)[0]


def lesion_scores(prediction: np.ndarray, truth: np.ndarray, spacing: tuple) -> tuple[LesionWise, LesionMatch]:
    """:func:`lesion_wise`'s figures and the :class:`LesionMatch` they came from."""
    prediction, truth = np.asarray(prediction, dtype=bool), np.asarray(truth, dtype=bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in shape")
    predicted, _ = ndimage.label(prediction, _COMPONENTS)
    sizes = np.bincount(predicted.ravel())
    grouped, lesion_count = ndimage.label(ndimage.binary_dilation(truth, _DILATION, DILATION_ITERATIONS), _COMPONENTS)
    lesions_map = np.where(truth, grouped, 0)  # each true voxel named by the dilated component it lies in
    voxel_mm3 = float(np.prod(spacing))
    boxes = ndimage.find_objects(lesions_map, lesion_count)
    component_boxes = ndimage.find_objects(predicted)
    matched = np.zeros(len(component_boxes), dtype=bool)
    scores, volumes, lesion_hits = [], [], []
    for number, box in enumerate(boxes, start=1):
        if box is None:
            continue
        near = _box(box, truth.shape, DILATION_ITERATIONS)
        lesion = lesions_map[near] == number
        reach = ndimage.binary_dilation(lesion, _DILATION, DILATION_ITERATIONS)
        hits = [int(hit) for hit in np.unique(predicted[near][reach]) if hit]
        matched[[hit - 1 for hit in hits]] = True
        volume = int(lesion.sum())
        if volume * voxel_mm3 <= MIN_LESION_MM3:
            continue
        volumes.append(volume)
        if not hits:
            scores.append((0.0, MISSED_HD95))
            lesion_hits.append(())
            continue
        union = _box(_union_box([near, *(component_boxes[hit - 1] for hit in hits)]), truth.shape, 1)
        mine = lesions_map[union] == number
        overlaps = tuple((hit, int(np.count_nonzero((predicted[union] == hit) & mine))) for hit in hits)
        lesion_hits.append(overlaps)
        found = np.isin(predicted[union], hits)
        dice = 2.0 * sum(overlap for _, overlap in overlaps) / (int(sizes[hits].sum()) + volume)
        scores.append((dice, hausdorff95(found, mine, spacing)))
    match = LesionMatch(voxel_mm3, sizes[1:].astype(np.int64), matched, tuple(volumes), tuple(lesion_hits))
    false_positives = int(np.count_nonzero(~matched))
    count = len(scores) + false_positives
    if count == 0:
        return LesionWise(1.0, 0.0, 0, 0), match
    return LesionWise(dice=sum(dice for dice, _ in scores) / count,
                      hd95=(sum(hd for _, hd in scores) + false_positives * MISSED_HD95) / count,
                      lesions=len(scores), false_positives=false_positives), match


def _union_box(boxes: list[tuple]) -> tuple:
    return tuple(slice(min(box[axis].start for box in boxes), max(box[axis].stop for box in boxes))
                 for axis in range(3))


def score_structures(structures, predicted: list[np.ndarray], mask: np.ndarray, spacing: tuple) -> dict:
    """``{"overlaps": {name: Overlap}, "hd95": {name: mm}, "lesion_wise": {name: LesionWise},
    "lesion_matches": {name: LesionMatch}, "tumour": Overlap, "slices": SliceCounts}`` of each
    structure's predicted voxels against the mask's (``structures``: :class:`brainseg.labels.Structure`);
    ``tumour`` and ``slices`` count every structure as one."""
    overlaps, distances, lesions, matches = {}, {}, {}, {}
    for structure, prediction in zip(structures, predicted):
        truth = structure.of(mask)
        overlaps[structure.name] = Overlap.of(prediction, truth)
        distances[structure.name] = hausdorff95(prediction, truth, spacing)
        lesions[structure.name], matches[structure.name] = lesion_scores(prediction, truth, spacing)
    everything = np.logical_or.reduce(predicted)
    tumour = np.logical_or.reduce([structure.of(mask) for structure in structures])
    return {"overlaps": overlaps, "hd95": distances, "lesion_wise": lesions, "lesion_matches": matches,
            "tumour": Overlap.of(everything, tumour), "slices": SliceCounts.of(everything, tumour)}
