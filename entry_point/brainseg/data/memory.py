"""Training volumes held in memory: the reference the streamed pipeline is measured against.

``load_in_memory`` downloads each case's image and mask once and gives back cases whose series
answer ``read_region`` from RAM with the same values as the S3 region reader, so the same patch
stream (same slabs, same patches) runs with no request latency.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from brainseg.data.catalog import Case
from brainseg.data.series import Series
from brainseg.io import s3


class InMemorySeries:
    """A decoded series: ``read_region``/``read_volume`` like :class:`~brainseg.data.series.Series`."""

    def __init__(self, series: Series):
        self.volume = series.read_volume()
        self.spacing = series.spacing
        self.bytes_per_voxel = series.bytes_per_voxel

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.volume.shape)

    def read_region(self, z0: int, z1: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self.volume[z0:z1, y0:y1, x0:x1].copy()

    def read_volume(self) -> np.ndarray:
        return self.volume.copy()


def load_in_memory(cases: list[Case]) -> list[Case]:
    """Copies of ``cases`` with every sequence and the mask read whole into memory (concurrently)."""
    def load(case: Case) -> Case:
        mask = InMemorySeries(case.mask) if case.mask is not None else None
        images = tuple(InMemorySeries(series) if series is not None else None for series in case.images)
        return dataclasses.replace(case, images=images, mask=mask)
    return list(s3.executor().map(load, cases))
