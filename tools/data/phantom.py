"""Synthetic brain MR volumes with tumour masks, for demos, tests and benchmarks.

A head is an ellipsoid of scalp and skull around cerebrospinal fluid, grey and white matter with
ventricles; a tumour is an irregular blob (enhancing rim around a darker necrotic core) of varied
size and place inside the brain. A smooth multiplicative bias field and Rician noise make the
intensities look like a T1 post-contrast scan. Everything is drawn from one seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Mean intensities of each tissue (arbitrary scanner units, T1 post-contrast-like).
SCALP, SKULL, CSF, GREY, WHITE, ENHANCING, NECROSIS = 650.0, 120.0, 260.0, 560.0, 760.0, 1150.0, 330.0


@dataclass(frozen=True)
class Phantom:
    """An image ``(D, H, W)`` uint16 and its tumour mask uint8 (1 = tumour)."""

    image: np.ndarray
    mask: np.ndarray


def _radius(shape: tuple[int, int, int], centre, axes) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grids, centre, axes)))


def make_phantom(shape: tuple[int, int, int], rng: np.random.Generator,
                 noise: float = 0.04) -> Phantom:
    """One synthetic head of ``shape`` ``(D, H, W)`` voxels.

    Args:
        shape: volume size; the head fills most of it.
        rng: the generator every random choice is drawn from.
        noise: noise standard deviation as a fraction of white-matter intensity.
    """
    shape = tuple(int(n) for n in shape)
    centre = np.asarray(shape) / 2.0 + rng.normal(0, 0.02, 3) * np.asarray(shape)
    head_axes = np.asarray(shape) * rng.uniform(0.40, 0.46, 3)
    r = _radius(shape, centre, head_axes)
    image = np.zeros(shape, dtype=np.float32)
    image[r < 1.0] = SCALP
    image[r < 0.93] = SKULL
    brain = r < 0.86
    image[brain] = CSF
    image[r < 0.82] = GREY
    white = r < 0.62
    image[white] = WHITE
    ventricle_axes = head_axes * np.asarray([0.18, 0.10, 0.22])
    for side in (-1, 1):
        offset = np.asarray([0.0, 0.0, side * 0.12]) * head_axes
        image[_radius(shape, centre + offset, ventricle_axes) < 1.0] = CSF

    # Tumour: an ellipsoid whose radius is perturbed by low-order harmonics of direction.
    size = rng.uniform(0.10, 0.32)
    tumour_axes = head_axes * size * rng.uniform(0.7, 1.3, 3)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    tumour_centre = centre + direction * head_axes * rng.uniform(0.0, 0.82 - size)
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    delta = [(g - c) / a for g, c, a in zip(grids, tumour_centre, tumour_axes)]
    radius = np.sqrt(delta[0] ** 2 + delta[1] ** 2 + delta[2] ** 2)
    wobble = 1.0
    for _ in range(3):
        weights = rng.normal(0, 0.12, 3)
        wobble = wobble + np.sin(sum(w * d * rng.uniform(2, 5) for w, d in zip(weights, delta)))  * 0.15
    tumour = (radius < wobble) & brain
    if not tumour.any():  # a tiny tumour can vanish after intersecting with the brain
        index = tuple(np.clip(np.round(tumour_centre).astype(int), 0, np.asarray(shape) - 1))
        tumour[index] = True
    image[tumour] = ENHANCING
    image[tumour & (radius < 0.55 * wobble)] = NECROSIS
    oedema = (radius < 1.5 * wobble) & ~tumour & white
    image[oedema] *= 0.85

    # Smooth bias field: product of low-frequency cosines along each axis.
    bias = np.ones(shape, dtype=np.float32)
    for axis, n in enumerate(shape):
        profile = 1.0 + 0.08 * np.cos(np.linspace(0, np.pi, n) * rng.uniform(0.5, 1.5) + rng.uniform(0, np.pi))
        bias *= profile.astype(np.float32).reshape([-1 if i == axis else 1 for i in range(3)])
    image *= bias
    sigma = noise * WHITE
    real = image + rng.normal(0, sigma, shape).astype(np.float32)
    imaginary = rng.normal(0, sigma, shape).astype(np.float32)
    image = np.sqrt(real * real + imaginary * imaginary)
    return Phantom(image=np.clip(image, 0, 65535).astype(np.uint16), mask=tumour.astype(np.uint8))
