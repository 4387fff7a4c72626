"""Intensity normalisation and padding of patches (numpy); augmentation is :mod:`brainseg.data.augment`."""

from __future__ import annotations

import numpy as np

from brainseg.data.summary import Intensity


def normalize(image: np.ndarray, mode: str, stats: Intensity) -> np.ndarray:
    """One sequence's voxels: z-score with its body mean/std, or min-max of its robust range clipped
    to [0, 1]."""
    if mode == "zscore":
        return (image - np.float32(stats.mean)) / np.float32(stats.std)
    if mode == "minmax":
        span = max(stats.high - stats.low, 1e-6)
        return np.clip((image - np.float32(stats.low)) / np.float32(span), 0.0, 1.0)
    raise ValueError(f"normalization {mode!r}: expected 'zscore' or 'minmax'")


def pad_to(array: np.ndarray, size: tuple) -> np.ndarray:
    """Centre ``array`` in a zero array of ``size`` (no-op when it already has that shape)."""
    if array.shape == tuple(size):
        return array
    out = np.zeros(size, dtype=array.dtype)
    offsets = [(s - a) // 2 for s, a in zip(size, array.shape)]
    out[tuple(slice(o, o + a) for o, a in zip(offsets, array.shape))] = array
    return out
