"""Is there a tumour: study- and slice-level detection read from a segmentation.

A study's score is the volume of its largest predicted tumour component after postprocessing, in
ml: the largest 26-connected component of any structure (for BraTS regions, of the whole tumour). A
speck of a few voxels is not a tumour, and a total volume would let many specks add up to one. A
study is called tumour-present when its score is above a threshold chosen on the validation
studies, where it maximises sensitivity + specificity - 1 (Youden's J; ties to the lower threshold,
favouring sensitivity), placed halfway to the next score. When validation holds no tumour-free
study (or no tumour), or no threshold does better than chance there (J <= 0), none is chosen: any
predicted component is a tumour (threshold 0).

Slice-level, as 2D pipelines report it: each slice of the study's own grid (its acquisition's
slices) holds tumour or not, in the truth and in the prediction: found, missed, false alarm or
clean.

The ROC curve and its area (the probability that a study with tumour scores above one without,
ties counting half) need both kinds of study; without them they are ``None``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from brainseg.overlap import LesionMatch

_COMPONENTS = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity, as lesion-wise scoring


@dataclass(frozen=True)
class SliceCounts:
    """Slices by whether the truth and the prediction hold tumour there."""

    found: int = 0
    missed: int = 0
    false_alarms: int = 0
    clean: int = 0

    @classmethod
    def of(cls, prediction: np.ndarray, truth: np.ndarray) -> SliceCounts:
        """Counts over the slices (axis 0) of boolean ``(D, H, W)`` volumes."""
        predicted = np.asarray(prediction, dtype=bool).reshape(len(prediction), -1).any(axis=1)
        present = np.asarray(truth, dtype=bool).reshape(len(truth), -1).any(axis=1)
        return cls(int(np.count_nonzero(predicted & present)), int(np.count_nonzero(~predicted & present)),
                   int(np.count_nonzero(predicted & ~present)), int(np.count_nonzero(~predicted & ~present)))

    def __add__(self, other: SliceCounts) -> SliceCounts:
        return SliceCounts(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))

    def to_dict(self) -> dict:
        return {**asdict(self), "sensitivity": _ratio(self.found, self.found + self.missed),
                "specificity": _ratio(self.clean, self.clean + self.false_alarms)}


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _one_kind(truths: np.ndarray) -> bool:
    """Every study holds tumour, or none does: nothing to tell apart."""
    return bool(truths.all() or not truths.any())


def largest_component_ml(matches: dict[str, LesionMatch], rules: dict | None = None) -> float:
    """A study's score from its structures' lesion matches (``{structure: LesionMatch}``): the
    largest component any structure keeps under ``rules`` (``{structure: Rule}``; none: all kept)."""
    largest = 0.0
    for name, match in matches.items():
        volumes = np.asarray(match.component_voxels, dtype=np.float64) * match.voxel_mm3
        if rules and name in rules:
            volumes = volumes[rules[name].keeps(volumes)]
        if len(volumes):
            largest = max(largest, float(volumes.max()))
    return largest / 1000.0


def largest_component_ml_of(masks: list[np.ndarray], spacing: tuple) -> float:
    """The same score from predicted structure masks (booleans ``(D, H, W)``, voxel ``spacing`` mm)."""
    voxels = 0
    for mask in masks:
        labelled, count = ndimage.label(mask, _COMPONENTS)
        if count:
            voxels = max(voxels, int(np.bincount(labelled.ravel())[1:].max()))
    return voxels * float(np.prod(spacing)) / 1000.0


@dataclass(frozen=True)
class Threshold:
    """Tumour-present above ``ml``; ``chosen_on`` says how it was chosen."""

    ml: float = 0.0
    chosen_on: str = "none: any predicted component"

    def present(self, score_ml: float) -> bool:
        return score_ml > self.ml

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data) -> Threshold:
        """The threshold :meth:`to_dict` wrote.

        Raises:
            ValueError: not ``{"ml": a number >= 0, "chosen_on": text}``.
        """
        ml = data.get("ml") if isinstance(data, dict) else None
        if (not isinstance(data, dict) or set(data) != {"ml", "chosen_on"} or isinstance(ml, bool)
                or not isinstance(ml, (int, float)) or not ml >= 0 or not isinstance(data["chosen_on"], str)):
            raise ValueError(f"detection threshold {data!r}: expected {{'ml': a number >= 0, 'chosen_on': text}}")
        return cls(float(ml), data["chosen_on"])


def choose_threshold(scores: list[float], truths: list[bool]) -> Threshold:
    """The validation studies' threshold (module docstring): ``scores`` in ml, ``truths`` whether
    each study holds tumour."""
    scores, truths = np.asarray(scores, dtype=np.float64), np.asarray(truths, dtype=bool)
    if _one_kind(truths):
        kind = "tumour-free" if truths.all() else "tumour"
        return Threshold(0.0, f"default (no {kind} study among {len(truths)} validation cases): any predicted "
                              "component")
    values = np.unique(np.concatenate([[0.0], scores]))
    best, best_j = 0.0, -2.0
    for value in values:
        called = scores > value
        j = np.mean(called[truths]) + np.mean(~called[~truths]) - 1.0
        if j > best_j + 1e-12:
            best, best_j = float(value), float(j)
    if best_j <= 0:
        return Threshold(0.0, f"default (no threshold separates the {len(truths)} validation cases better than "
                              "chance): any predicted component")
    above = values[values > best]
    threshold = (best + float(above[0])) / 2.0 if len(above) else best
    called = scores > threshold
    return Threshold(round(threshold, 4), f"validation, {len(truths)} cases: sensitivity "
                                          f"{np.mean(called[truths]):.2f}, specificity {np.mean(~called[~truths]):.2f}")


def threshold_of(matches: dict[str, dict[str, LesionMatch]], truths: dict[str, bool], rules: dict) -> Threshold:
    """:func:`choose_threshold` on validation cases' lesion matches (``{case_id: {structure:
    LesionMatch}}``) scored under ``rules``, ``truths`` saying whether each case holds tumour."""
    cases = sorted(matches)
    return choose_threshold([largest_component_ml(matches[case_id], rules) for case_id in cases],
                            [bool(truths[case_id]) for case_id in cases])


def roc_curve(scores: list[float], truths: list[bool]) -> list[tuple[float, float]] | None:
    """``[(false-positive rate, true-positive rate), ...]`` from (0, 0) to (1, 1), one point per
    distinct score; ``None`` without both kinds of study."""
    scores, truths = np.asarray(scores, dtype=np.float64), np.asarray(truths, dtype=bool)
    if _one_kind(truths):
        return None
    points = [(0.0, 0.0)]
    for value in np.unique(scores)[::-1]:
        called = scores >= value
        points.append((float(np.mean(called[~truths])), float(np.mean(called[truths]))))
    return points  # the lowest score calls every study: (1, 1)


def roc_auc(scores: list[float], truths: list[bool]) -> float | None:
    """The area under the ROC curve (Mann-Whitney: ties count half); ``None`` without both kinds."""
    scores, truths = np.asarray(scores, dtype=np.float64), np.asarray(truths, dtype=bool)
    if _one_kind(truths):
        return None
    positive, negative = scores[truths][:, None], scores[~truths][None, :]
    return float(np.mean((positive > negative) + 0.5 * (positive == negative)))


def detection_figures(scores: list[float], truths: list[bool], threshold: Threshold,
                      slices: SliceCounts | None = None) -> dict:
    """summary.json's ``detection``: the confusion table at ``threshold``, sensitivity, specificity,
    ROC AUC and curve over the studies, and the slice-level counts."""
    scores, truths = np.asarray(scores, dtype=np.float64), np.asarray(truths, dtype=bool)
    called = scores > threshold.ml
    table = {"true_positives": int(np.count_nonzero(called & truths)),
             "false_negatives": int(np.count_nonzero(~called & truths)),
             "false_positives": int(np.count_nonzero(called & ~truths)),
             "true_negatives": int(np.count_nonzero(~called & ~truths))}
    curve = roc_curve(scores, truths)
    figures = {"score": "largest predicted component, ml", "threshold": threshold.to_dict(), "cases": len(truths),
               "with_tumour": int(truths.sum()), "tumour_free": int((~truths).sum()), **table,
               "sensitivity": _ratio(table["true_positives"], int(truths.sum())),
               "specificity": _ratio(table["true_negatives"], int((~truths).sum())),
               "roc_auc": roc_auc(scores, truths), "roc": [list(point) for point in curve] if curve else None}
    if slices is not None:
        figures["slices"] = slices.to_dict()
    return figures
