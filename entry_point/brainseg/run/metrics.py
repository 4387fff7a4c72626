"""Overlap metrics from voxel counts, so per-case and whole-set figures come from the same numbers,
and the 95th-percentile Hausdorff distance in mm (MONAI's).

Dice = 2|P∩G| / (|P| + |G|) and IoU = |P∩G| / |P∪G|; when both prediction and truth are empty
the case is a perfect 1.0 (nothing to find, nothing found). HD95 is 0 mm then, and the volume's
diagonal in mm when exactly one of them is empty (a missed or invented structure is the worst
boundary error, as the BraTS ranking counts it). :func:`tumour_centre` locates the
tumour the same way for the saved prediction crops and the review's overlays.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance


@dataclass(frozen=True)
class Overlap:
    """Voxel counts of one case (or summed over several): true positives, predicted, true."""

    intersection: int
    predicted: int
    truth: int

    @classmethod
    def of(cls, prediction: np.ndarray, truth: np.ndarray) -> Overlap:
        prediction, truth = np.asarray(prediction, dtype=bool), np.asarray(truth, dtype=bool)
        if prediction.shape != truth.shape:
            raise ValueError(f"prediction shape {prediction.shape} differs from truth shape {truth.shape}")
        return cls(int(np.count_nonzero(prediction & truth)), int(np.count_nonzero(prediction)),
                   int(np.count_nonzero(truth)))

    def __add__(self, other: Overlap) -> Overlap:
        return Overlap(self.intersection + other.intersection, self.predicted + other.predicted,
                       self.truth + other.truth)

    @property
    def dice(self) -> float:
        total = self.predicted + self.truth
        return 1.0 if total == 0 else 2.0 * self.intersection / total

    @property
    def iou(self) -> float:
        union = self.predicted + self.truth - self.intersection
        return 1.0 if union == 0 else self.intersection / union


def tumour_centre(mask: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """The ``(z, y, x)`` voxel at the centre of the true tumour, else of the predicted one, else of
    the volume."""
    target = mask if mask.any() else prediction
    points = np.argwhere(target > 0)
    return (points.mean(axis=0) if len(points) else np.asarray(mask.shape) / 2).round().astype(int)


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


def score_structures(structures, predicted: list[np.ndarray], mask: np.ndarray, spacing: tuple) -> dict:
    """``{"overlaps": {name: Overlap}, "hd95": {name: mm}, "tumour": Overlap}`` of each structure's
    predicted voxels against the mask's (``structures``: :class:`brainseg.labels.Structure`)."""
    overlaps, distances = {}, {}
    for structure, prediction in zip(structures, predicted):
        truth = structure.of(mask)
        overlaps[structure.name] = Overlap.of(prediction, truth)
        distances[structure.name] = hausdorff95(prediction, truth, spacing)
    everything = np.logical_or.reduce(predicted)
    return {"overlaps": overlaps, "hd95": distances,
            "tumour": Overlap.of(everything, np.logical_or.reduce([structure.of(mask) for structure in structures]))}
