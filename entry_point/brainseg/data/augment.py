"""Data augmentation of patches: what real scans vary in, drawn from one seeded generator per patch.

Spatial (image and label alike; labels by nearest neighbour): mirroring on each axis, 90-degree
in-plane turns of square patches, and with probability ``SPATIAL_PROBABILITY`` each a rotation
(mostly in-plane), a scaling and an elastic deformation (a coarse random displacement grid,
smoothly interpolated), applied as one resampling. Intensity, per channel (each sequence varies on
its own): a smooth multiplicative bias field, gamma, Gaussian blur, a lower-resolution
acquisition (down- then up-sampled), scale and shift, and Gaussian noise. The patch depends only
on the generator, so a stream stays deterministic and resumable; torch does the resampling (one
grid sample for all spatial changes, labels by nearest neighbour).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SPATIAL_PROBABILITY = 0.2  # rotation, scaling and elastic deformation, each
ROTATION_DEGREES = (15.0, 5.0, 5.0)  # about the slice normal (in-plane), then about the in-plane axes
SCALE = (0.85, 1.15)
ELASTIC_VOXELS = 2.0  # standard deviation of the control points' displacement
ELASTIC_GRID = 4  # control points per axis
BIAS_PROBABILITY, BIAS_STRENGTH = 0.3, 0.3  # exp(field), the field's coefficients within +-strength
GAMMA_PROBABILITY, GAMMA = 0.3, (0.7, 1.5)
BLUR_PROBABILITY, BLUR_SIGMA = 0.2, (0.5, 1.0)  # voxels
LOW_RES_PROBABILITY, LOW_RES = 0.15, (1.0, 2.0)  # the acquisition's voxels this many times larger
INTENSITY_SCALE = (0.9, 1.1)
INTENSITY_SHIFT = (-0.1, 0.1)
NOISE_PROBABILITY = 0.15
NOISE_STD = (0.0, 0.1)  # in normalised units


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation about z (the slice normal), then y, then x, in (x, y, z) voxel coordinates."""
    (cz, sz), (cy, sy), (cx, sx) = ((math.cos(a), math.sin(a)) for a in angles)
    about_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    about_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    about_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return about_x @ about_y @ about_z


def _spatial(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    rotate, scale, elastic = (rng.random() < SPATIAL_PROBABILITY for _ in range(3))
    angles = np.deg2rad(rng.uniform(-1, 1, 3) * ROTATION_DEGREES)
    factor = rng.uniform(*SCALE)
    coarse = rng.normal(0.0, ELASTIC_VOXELS, (3, ELASTIC_GRID, ELASTIC_GRID, ELASTIC_GRID))
    if not (rotate or scale or elastic):
        return image, label
    depth, height, width = image.shape[1:]
    half = np.array([width, height, depth]) / 2.0  # voxels per normalised unit, (x, y, z)
    matrix = np.eye(3)
    if rotate:
        matrix = _rotation(angles) @ matrix
    if scale:
        matrix = matrix / factor
    theta = np.zeros((1, 3, 4))
    theta[0, :, :3] = np.diag(1.0 / half) @ matrix @ np.diag(half)  # rotate in voxels, not in the unit cube
    grid = F.affine_grid(torch.from_numpy(theta).float(), [1, 1, depth, height, width], align_corners=False)
    if elastic:
        field = torch.from_numpy(coarse / half[:, None, None, None]).float()[None]
        field = F.interpolate(field, size=(depth, height, width), mode="trilinear", align_corners=True)
        grid = grid + field[0].permute(1, 2, 3, 0)[None]
    moved = F.grid_sample(torch.from_numpy(np.ascontiguousarray(image))[None], grid, mode="bilinear",
                          padding_mode="border", align_corners=False)[0].numpy()
    labels = F.grid_sample(torch.from_numpy(np.ascontiguousarray(label, dtype=np.float32))[None, None], grid,
                           mode="nearest", padding_mode="zeros", align_corners=False)[0, 0].numpy()
    return moved, labels.astype(label.dtype)


def _gaussian_blur(channel: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (edges replicated), one 1D convolution per axis."""
    radius = max(1, int(math.ceil(2 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).reshape(1, 1, -1)
    volume = torch.from_numpy(np.ascontiguousarray(channel))
    for axis in range(3):
        moved = volume.movedim(axis, -1)
        shape = moved.shape
        rows = F.pad(moved.reshape(-1, 1, shape[-1]), (radius, radius), mode="replicate")
        volume = F.conv1d(rows, kernel).reshape(shape).movedim(-1, axis)
    return volume.contiguous().numpy()


def _low_resolution(channel: np.ndarray, factor: float) -> np.ndarray:
    volume = torch.from_numpy(np.ascontiguousarray(channel))[None, None]
    small = [max(1, int(round(n / factor))) for n in channel.shape]
    coarse = F.interpolate(volume, size=small, mode="trilinear", align_corners=False)
    return F.interpolate(coarse, size=channel.shape, mode="trilinear", align_corners=False)[0, 0].numpy()


def _bias_field(shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """``exp`` of a random polynomial of degree 2 over the patch (coordinates in [-1, 1])."""
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij")
    terms = (x, y, z, x * y, x * z, y * z, x * x, y * y, z * z)
    coefficients = rng.uniform(-BIAS_STRENGTH, BIAS_STRENGTH, len(terms)) / 3.0
    return np.exp(sum(np.float32(c) * t for c, t in zip(coefficients, terms)))


def _intensity(channel: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    bias, gamma, blur, low = (rng.random() < p for p in (BIAS_PROBABILITY, GAMMA_PROBABILITY, BLUR_PROBABILITY,
                                                         LOW_RES_PROBABILITY))
    exponent, sigma, factor = rng.uniform(*GAMMA), rng.uniform(*BLUR_SIGMA), rng.uniform(*LOW_RES)
    low_value, high_value = float(channel.min()), float(channel.max())
    span = max(high_value - low_value, 1e-6)
    if bias:
        channel = (channel - low_value) * _bias_field(channel.shape, rng) + low_value
    if gamma:
        channel = np.clip((channel - low_value) / span, 0.0, None) ** np.float32(exponent) * span + low_value
    if blur:
        channel = _gaussian_blur(channel.astype(np.float32), sigma)
    if low:
        channel = _low_resolution(channel.astype(np.float32), factor)
    return channel.astype(np.float32)


def augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
            minmax: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One augmented patch. ``image`` is ``(C, D, H, W)`` float32, ``label`` ``(D, H, W)``; with
    ``minmax`` the image stays in [0, 1]."""
    image, label = _spatial(image, label, rng)
    for axis in range(3):
        if rng.random() < 0.5:
            image, label = np.flip(image, axis + 1), np.flip(label, axis)
    if image.shape[2] == image.shape[3]:
        turns = int(rng.integers(4))
        image, label = np.rot90(image, turns, axes=(2, 3)), np.rot90(label, turns, axes=(1, 2))
    image = np.stack([_intensity(channel, rng) for channel in image])
    channels = (len(image), 1, 1, 1)
    image = (image * rng.uniform(*INTENSITY_SCALE, channels).astype(np.float32)
             + rng.uniform(*INTENSITY_SHIFT, channels).astype(np.float32))
    if rng.random() < NOISE_PROBABILITY:
        image = image + rng.normal(0.0, rng.uniform(*NOISE_STD), image.shape).astype(np.float32)
    if minmax:
        image = np.clip(image, 0.0, 1.0)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label)
