"""Per-structure scores of a case: Dice and IoU from :class:`brainseg.overlap.Overlap`, and the
95th-percentile Hausdorff distance in mm (MONAI's).

HD95 is 0 mm when both prediction and truth are empty, and the volume's diagonal in mm when exactly
one of them is (a missed or invented structure is the worst boundary error, as the BraTS ranking
counts it).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

from brainseg.overlap import Overlap


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
