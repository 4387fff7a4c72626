"""Intensity normalisation and padding of patches (numpy); augmentation is :mod:`brainseg.data.augment`."""

from __future__ import annotations

import numpy as np

from brainseg.data.summary import Intensity


def normalize(image: np.ndarray, mode: str, stats: Intensity, out: np.ndarray | None = None) -> np.ndarray:
    """One sequence's voxels: z-score with its body mean/std, or min-max of its robust range clipped
    to [0, 1]; written into ``out`` (float32, ``image``'s shape) when given."""
    if mode == "zscore":
        out = np.subtract(image, np.float32(stats.mean), out=out, dtype=np.float32)
        return np.divide(out, np.float32(stats.std), out=out)
    if mode == "minmax":
        span = max(stats.high - stats.low, 1e-6)
        out = np.subtract(image, np.float32(stats.low), out=out, dtype=np.float32)
        np.divide(out, np.float32(span), out=out)
        return np.clip(out, 0.0, 1.0, out=out)
    raise ValueError(f"normalization {mode!r}: expected 'zscore' or 'minmax'")


def pad_to(array: np.ndarray, size: tuple) -> np.ndarray:
    """Centre ``array`` in a zero array of ``size`` (no-op when it already has that shape)."""
    if array.shape == tuple(size):
        return array
    out = np.zeros(size, dtype=array.dtype)
    offsets = [(s - a) // 2 for s, a in zip(size, array.shape)]
    out[tuple(slice(o, o + a) for o, a in zip(offsets, array.shape))] = array
    return out
