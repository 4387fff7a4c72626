"""A dataset's fingerprint: what a training plan is derived from (nnU-Net's term), computed from
the catalog's headers and cached case summaries, so it costs no pixel reads.

Spacing and shape statistics over the cases (median, and the 10th percentile of the spacing for
thick-slice data), each sequence's intensity statistics (medians over the cases of their robust
percentiles, mean and standard deviation), the tumour's size and label mix, and, per scored
structure, how many lesions the cases hold (what postprocessing may assume).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class Fingerprint:
    """Statistics of the training cases: spacings in mm ``(dz, dy, dx)``, shapes in voxels
    ``(D, H, W)``, intensities per sequence, the tumour's median volume in ml, the median share
    of the tumour each label value takes and, per structure, :class:`LesionCounts`."""

    cases: int
    median_spacing: tuple
    spacing_p10: tuple
    median_shape: tuple
    intensities: dict
    median_tumour_ml: float
    label_shares: dict
    lesions: dict = field(default_factory=dict)  # structure name -> LesionCounts

    @classmethod
    def of(cls, cases, sequences: tuple, structures: tuple = ()) -> Fingerprint:
        """The fingerprint of ``cases`` (:class:`brainseg.data.catalog.Case`, their sequences in
        the order of ``sequences``), with the lesions of each of ``structures``
        (:class:`brainseg.labels.Structure`).

        Raises:
            ValueError: no cases.
        """
        if not cases:
            raise ValueError("a fingerprint needs at least one case")
        spacings = np.asarray([case.image.spacing for case in cases], dtype=float)
        shapes = np.asarray([case.image.shape for case in cases], dtype=float)
        intensities = {}
        for channel, sequence in enumerate(sequences):
            stats = [case.summary.intensities[channel] for case in cases]
            intensities[sequence] = {name: round(float(np.median([getattr(s, name) for s in stats])), 4)
                                     for name in ("low", "high", "mean", "std")}
        shares: dict[int, list[float]] = {}
        for case in cases:
            total = sum(count for _, count in case.summary.label_counts)
            for value, count in case.summary.label_counts:
                shares.setdefault(int(value), []).append(count / total if total else 0.0)
        return cls(cases=len(cases), median_spacing=_rounded(np.median(spacings, axis=0)),
                   spacing_p10=_rounded(np.percentile(spacings, 10, axis=0)),
                   median_shape=tuple(int(v) for v in np.median(shapes, axis=0)), intensities=intensities,
                   median_tumour_ml=round(float(np.median([case.summary.tumour_ml for case in cases])), 3),
                   label_shares={value: round(float(np.median(values + [0.0] * (len(cases) - len(values)))), 4)
                                 for value, values in sorted(shares.items())},
                   lesions={structure.name: LesionCounts.of(cases, structure.values) for structure in structures})

    def to_dict(self) -> dict:
        return {**asdict(self), "label_shares": {str(k): v for k, v in self.label_shares.items()}}


@dataclass(frozen=True)
class LesionCounts:
    """How many lesions one structure forms per case: ``several`` cases hold more than one,
    ``most`` is the largest count, ``uncounted`` cases have no count (summaries from before the
    counts, or masks of many label values)."""

    cases: int
    several: int
    most: int
    uncounted: int

    @classmethod
    def of(cls, cases, values: frozenset | None) -> LesionCounts:
        counts = [case.summary.lesions_of(values) for case in cases]
        known = [count for count in counts if count is not None]
        return cls(cases=len(counts), several=sum(count > 1 for count in known), most=max(known, default=0),
                   uncounted=len(counts) - len(known))


def _rounded(values) -> tuple:
    return tuple(round(float(v), 4) for v in values)
