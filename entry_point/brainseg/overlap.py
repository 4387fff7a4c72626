"""Overlap metrics from voxel counts, so per-case and whole-set figures come from the same numbers,
and the tumour's centre. numpy only: training, prediction and the review (which has no torch) share it.

Dice = 2|P∩G| / (|P| + |G|) and IoU = |P∩G| / |P∪G|; when both prediction and truth are empty
the case is a perfect 1.0 (nothing to find, nothing found). :func:`tumour_centre` locates the
tumour the same way for the saved prediction crops and the review's overlays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
