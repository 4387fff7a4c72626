"""Overlap metrics from voxel counts, so per-case and whole-set figures come from the same numbers,
which predicted components overlap which true lesion (:class:`LesionMatch`, what postprocessing is
chosen from), and the tumour's centre. numpy only: training, prediction, the review and the
launcher's cross-validation summary (which have no torch) share it.

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


@dataclass(frozen=True)
class LesionMatch:
    """Which predicted components of one region belong to which scored true lesion: enough to
    recompute the lesion-wise Dice (:func:`brainseg.metrics.lesion_wise`) for any subset of the
    components (what postprocessing removes) without labelling the volumes again.

    ``component_voxels[i]`` is the size of predicted component ``i + 1``; ``matched`` marks the
    components that touch a lesion (a scored one or one too small to score); per scored lesion,
    ``volumes`` its voxels and ``hits`` its ``(component, overlapping voxels)`` pairs.
    """

    voxel_mm3: float
    component_voxels: np.ndarray
    matched: np.ndarray
    volumes: tuple = ()
    hits: tuple = ()

    def dice(self, keep: np.ndarray | None = None) -> float:
        """The region's lesion-wise Dice with only the components ``keep`` marks (all: ``None``)."""
        keep = np.ones(len(self.component_voxels), dtype=bool) if keep is None else keep
        total = 0.0
        for volume, hits in zip(self.volumes, self.hits):
            kept = [(component, overlap) for component, overlap in hits if keep[component - 1]]
            if kept:
                found = sum(int(self.component_voxels[component - 1]) for component, _ in kept)
                total += 2.0 * sum(overlap for _, overlap in kept) / (found + volume)
        count = len(self.volumes) + int(np.count_nonzero(keep & ~self.matched))
        return 1.0 if count == 0 else total / count

    def to_dict(self) -> dict:
        return {"voxel_mm3": self.voxel_mm3, "component_voxels": [int(v) for v in self.component_voxels],
                "matched": [bool(v) for v in self.matched], "volumes": [int(v) for v in self.volumes],
                "hits": [[[int(component), int(overlap)] for component, overlap in hits] for hits in self.hits]}

    @classmethod
    def from_dict(cls, data: dict) -> LesionMatch:
        """The match :meth:`to_dict` wrote.

        Raises:
            ValueError: not such a dict, or components named that do not exist.
        """
        try:
            match = cls(float(data["voxel_mm3"]), np.asarray(data["component_voxels"], dtype=np.int64),
                        np.asarray(data["matched"], dtype=bool), tuple(int(v) for v in data["volumes"]),
                        tuple(tuple((int(c), int(o)) for c, o in hits) for hits in data["hits"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"lesion match {str(data)[:200]}: expected voxel_mm3, component_voxels, matched, "
                             f"volumes and hits ({err})") from None
        components = len(match.component_voxels)
        if len(match.matched) != components or len(match.hits) != len(match.volumes) or any(
                not 1 <= c <= components for hits in match.hits for c, _ in hits):
            raise ValueError(f"lesion match {str(data)[:200]}: components, lesions and hits do not agree")
        return match
