"""The self-supervised pretext task: reconstruct an image from a copy with blocks blanked out.

Blocks of ``BLOCK`` voxels are dropped with probability ``DROP``; the network must fill them
from context, which a U-Net cannot do by copying its input through the skip connections.
"""

from __future__ import annotations

import numpy as np

BLOCK = 8
DROP = 0.3


def drop_blocks(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` (``(..., D, H, W)``) with random ``BLOCK``³ blocks set to 0 (a copy)."""
    spatial = image.shape[-3:]
    coarse = tuple(-(-n // BLOCK) for n in spatial)
    keep = rng.random(image.shape[:-3] + coarse) >= DROP
    for axis in range(-3, 0):
        keep = np.repeat(keep, BLOCK, axis=axis)
    keep = keep[..., :spatial[0], :spatial[1], :spatial[2]]
    return np.where(keep, image, np.zeros((), dtype=image.dtype))
