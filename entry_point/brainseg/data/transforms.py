"""Intensity normalisation and data augmentation of patches (numpy, seeded generators only)."""

from __future__ import annotations

import numpy as np

from brainseg.data.summary import Intensity

NOISE_PROBABILITY = 0.15
NOISE_STD = (0.0, 0.1)  # in normalised units
INTENSITY_SCALE = (0.9, 1.1)
INTENSITY_SHIFT = (-0.1, 0.1)


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


def augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
            minmax: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Random flips on each axis, a 90-degree in-plane rotation (square patches), per-channel
    intensity scale and shift, and occasional Gaussian noise. ``image`` is ``(C, D, H, W)``,
    ``label`` ``(D, H, W)``."""
    for axis in range(3):
        if rng.random() < 0.5:
            image, label = np.flip(image, axis + 1), np.flip(label, axis)
    if image.shape[2] == image.shape[3]:
        turns = int(rng.integers(4))
        image, label = np.rot90(image, turns, axes=(2, 3)), np.rot90(label, turns, axes=(1, 2))
    channels = (len(image), 1, 1, 1)
    image = (image * rng.uniform(*INTENSITY_SCALE, channels).astype(np.float32)
             + rng.uniform(*INTENSITY_SHIFT, channels).astype(np.float32))
    if rng.random() < NOISE_PROBABILITY:
        image = image + rng.normal(0.0, rng.uniform(*NOISE_STD), image.shape).astype(np.float32)
    if minmax:
        image = np.clip(image, 0.0, 1.0)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label)
