"""Data augmentation of patches: what real scans vary in, drawn per patch, applied on the batch.

Two halves, so the DataLoader workers only read and cut while the training device does the
arithmetic. :func:`draw` (in the worker) takes every random number a patch's augmentation needs
from the patch's own seeded generator and packs them into a vector that travels with the patch;
:func:`augment_batch` (on the model's device: a GPU on a GPU instance, else the CPU) applies each
patch's draws to a batch. The patch depends only on its generator, so a stream stays deterministic
and a resumed run continues exactly; a patch augmented in a batch equals it augmented alone.

Spatial (image and label alike; labels by nearest neighbour): mirroring on each axis, 90-degree
in-plane turns of square patches, and with probability ``SPATIAL_PROBABILITY`` each a rotation
(mostly in-plane), a scaling and an elastic deformation (a coarse random displacement grid,
smoothly interpolated), applied as one resampling of the patches that drew any of them. Intensity,
per channel (each sequence varies on its own): a smooth multiplicative bias field, gamma, Gaussian
blur, a lower-resolution acquisition (down- then up-sampled), scale and shift, and Gaussian noise.
Sequence dropout (``--sequence-dropout``, off by default): with its probability a patch has one of its
sequences, drawn evenly, replaced by zeros (the body mean after z-scoring), so the network learns
to find a tumour from the sequences left (HeMIS's modality dropout) and meets a zero-filled
missing sequence (``--missing-sequences zero``) in training.
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
BIAS_TERMS = 9  # x, y, z, xy, xz, yz, x², y², z²

# The draws vector: spatial, then mirroring and turns, then each channel's intensity, then noise,
# then the dropped sequence (-1: none).
_ELASTIC = 3 * ELASTIC_GRID**3
_SPATIAL = 3 + 3 + 1 + _ELASTIC  # rotate/scale/elastic flags, angles, factor, control points
_GEOMETRY = _SPATIAL + 4  # three flips, quarter turns
_CHANNEL = 4 + 3 + BIAS_TERMS + 2  # bias/gamma/blur/low flags, exponent/sigma/factor, coefficients, scale, shift


def draws_length(channels: int) -> int:
    """The length of a patch's draws vector with ``channels`` channels."""
    return _GEOMETRY + channels * _CHANNEL + 3 + 1


def draw(rng: np.random.Generator, channels: int, square: bool, sequence_dropout: float = 0.0,
         droppable: tuple = ()) -> np.ndarray:
    """Every random number one patch's augmentation needs (float64, :func:`draws_length` long), in a
    fixed order from ``rng``; ``square``: the patch's in-plane sides are equal (turns allowed);
    ``sequence_dropout``: the probability that one sequence, drawn evenly among the ``droppable``
    channels (empty: any), is replaced by zeros (the draws before it do not depend on it)."""
    spatial = [float(rng.random() < SPATIAL_PROBABILITY) for _ in range(3)]
    angles = np.deg2rad(rng.uniform(-1, 1, 3) * ROTATION_DEGREES)
    factor = rng.uniform(*SCALE)
    coarse = rng.normal(0.0, ELASTIC_VOXELS, _ELASTIC)
    flips = [float(rng.random() < 0.5) for _ in range(3)]
    turns = float(rng.integers(4)) if square else 0.0
    parts = [spatial, angles, [factor], coarse, flips, [turns]]
    for _ in range(channels):
        flags = [float(rng.random() < p) for p in (BIAS_PROBABILITY, GAMMA_PROBABILITY, BLUR_PROBABILITY,
                                                    LOW_RES_PROBABILITY)]
        amounts = [rng.uniform(*GAMMA), rng.uniform(*BLUR_SIGMA), rng.uniform(*LOW_RES)]
        coefficients = rng.uniform(-BIAS_STRENGTH, BIAS_STRENGTH, BIAS_TERMS) / 3.0 if flags[0] else np.zeros(BIAS_TERMS)
        parts += [flags, amounts, coefficients, [rng.uniform(*INTENSITY_SCALE), rng.uniform(*INTENSITY_SHIFT)]]
    parts += [[float(rng.random() < NOISE_PROBABILITY), rng.uniform(*NOISE_STD), float(rng.integers(2**31))]]
    dropped = rng.random() < sequence_dropout
    among = droppable or range(channels)
    channel = float(among[rng.integers(len(among))])
    parts += [[channel if dropped else -1.0]]
    return np.concatenate([np.asarray(part, dtype=np.float64).ravel() for part in parts])


def _rotation(angles) -> np.ndarray:
    """Rotation about z (the slice normal), then y, then x, in (x, y, z) voxel coordinates."""
    (cz, sz), (cy, sy), (cx, sx) = ((math.cos(a), math.sin(a)) for a in angles)
    about_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    about_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    about_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return about_x @ about_y @ about_z


def _spatial(image: torch.Tensor, label: torch.Tensor, draws: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation, scaling and elastic deformation of the patches that drew any, in one resampling."""
    moving = [b for b in range(len(draws)) if draws[b, :3].any()]
    if not moving:
        return image, label
    depth, height, width = image.shape[2:]
    half = np.array([width, height, depth]) / 2.0  # voxels per normalised unit, (x, y, z)
    thetas, fields = [], []
    for b in moving:
        rotate, scale, elastic = draws[b, :3]
        matrix = np.eye(3)
        if rotate:
            matrix = _rotation(draws[b, 3:6]) @ matrix
        if scale:
            matrix = matrix / draws[b, 6]
        thetas.append(np.concatenate([np.diag(1.0 / half) @ matrix @ np.diag(half), np.zeros((3, 1))], axis=1))
        coarse = draws[b, 7:_SPATIAL].reshape(3, ELASTIC_GRID, ELASTIC_GRID, ELASTIC_GRID)
        fields.append(coarse / half[:, None, None, None] if elastic else np.zeros_like(coarse))
    device = image.device
    theta = torch.from_numpy(np.stack(thetas)).float().to(device)
    grid = F.affine_grid(theta, [len(moving), 1, depth, height, width], align_corners=False)
    field = F.interpolate(torch.from_numpy(np.stack(fields)).float().to(device), size=(depth, height, width),
                          mode="trilinear", align_corners=True)
    grid = grid + field.permute(0, 2, 3, 4, 1)
    index = torch.tensor(moving, device=device)
    image, label = image.clone(), label.clone()
    image[index] = F.grid_sample(image[index], grid, mode="bilinear", padding_mode="border", align_corners=False)
    label[index] = F.grid_sample(label[index].float(), grid, mode="nearest", padding_mode="zeros",
                                 align_corners=False).to(label.dtype)
    return image, label


def _gaussian_blur(channel: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (edges replicated), one 1D convolution per axis."""
    radius = max(1, int(math.ceil(2 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=channel.device)
    kernel = torch.exp(-offsets**2 / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).reshape(1, 1, -1)
    volume = channel
    for axis in range(3):
        moved = volume.movedim(axis, -1)
        shape = moved.shape
        rows = F.pad(moved.reshape(-1, 1, shape[-1]), (radius, radius), mode="replicate")
        volume = F.conv1d(rows, kernel).reshape(shape).movedim(-1, axis)
    return volume.contiguous()


def _low_resolution(channel: torch.Tensor, factor: float) -> torch.Tensor:
    small = [max(1, int(round(n / factor))) for n in channel.shape]
    coarse = F.interpolate(channel[None, None], size=small, mode="trilinear", align_corners=False)
    return F.interpolate(coarse, size=tuple(channel.shape), mode="trilinear", align_corners=False)[0, 0]


def _bias_field(shape: tuple, coefficients: np.ndarray, device) -> torch.Tensor:
    """``exp`` of a polynomial of degree 2 over the patch (coordinates in [-1, 1])."""
    z, y, x = torch.meshgrid(*(torch.linspace(-1, 1, n, device=device) for n in shape), indexing="ij")
    terms = (x, y, z, x * y, x * z, y * z, x * x, y * y, z * z)
    return torch.exp(sum(float(c) * t for c, t in zip(coefficients, terms)))


def _intensity(channel: torch.Tensor, draws: np.ndarray) -> torch.Tensor:
    """One channel's bias, gamma, blur, lower resolution, scale and shift (``draws``: its row)."""
    bias, gamma, blur, low = draws[:4]
    exponent, sigma, factor = draws[4:7]
    low_value, high_value = channel.min(), channel.max()
    span = torch.clamp(high_value - low_value, min=1e-6)
    if bias:
        channel = (channel - low_value) * _bias_field(tuple(channel.shape), draws[7:7 + BIAS_TERMS],
                                                      channel.device) + low_value
    if gamma:
        channel = torch.clamp((channel - low_value) / span, min=0.0) ** float(exponent) * span + low_value
    if blur:
        channel = _gaussian_blur(channel, float(sigma))
    if low:
        channel = _low_resolution(channel, float(factor))
    return channel * float(draws[-2]) + float(draws[-1])


def augment_batch(image: torch.Tensor, label: torch.Tensor, draws: torch.Tensor,
                  minmax: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch augmented on its own device, each patch by its draws.

    Args:
        image: ``(B, C, D, H, W)`` float.
        label: ``(B, 1, D, H, W)`` label values.
        draws: ``(B, draws_length(C))``, each row from :func:`draw`.
        minmax: keep the image in [0, 1] (min-max normalisation).
    """
    values = draws.detach().cpu().numpy().astype(np.float64)
    image, label = _spatial(image.float(), label, values)
    images, labels = [], []
    for b in range(len(values)):
        patch, patch_label = image[b], label[b]
        axes = [axis for axis in range(3) if values[b, _SPATIAL + axis]]
        if axes:
            patch, patch_label = torch.flip(patch, [a + 1 for a in axes]), torch.flip(patch_label, [a + 1 for a in axes])
        turns = int(values[b, _SPATIAL + 3])
        if turns:
            patch, patch_label = torch.rot90(patch, turns, (2, 3)), torch.rot90(patch_label, turns, (2, 3))
        rows = values[b, _GEOMETRY:_GEOMETRY + patch.shape[0] * _CHANNEL].reshape(patch.shape[0], _CHANNEL)
        patch = torch.stack([_intensity(channel, row) for channel, row in zip(patch, rows)])
        noisy, std, seed, dropped = values[b, -4:]
        if noisy:
            generator = torch.Generator(device=patch.device).manual_seed(int(seed))
            patch = patch + float(std) * torch.randn(patch.shape, generator=generator, device=patch.device)
        if dropped >= 0:
            patch[int(dropped)] = 0.0
        if minmax:
            patch = torch.clamp(patch, 0.0, 1.0)
        images.append(patch)
        labels.append(patch_label)
    return torch.stack(images).contiguous(), torch.stack(labels).contiguous()
