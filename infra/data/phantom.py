"""Synthetic brain MR volumes with tumour masks, for demos, tests and benchmarks.

A head is an ellipsoid of scalp and skull around cerebrospinal fluid, grey and white matter with
ventricles (multi-sequence studies: egg-shaped, with folded grey and white matter boundaries); a
tumour is an irregular blob (enhancing rim around a darker necrotic core) of varied size and place
inside the brain. A smooth multiplicative bias field and Rician noise make the
intensities look like a T1 post-contrast scan. Everything is drawn from one seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

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


def _blob(shape, centre, head_axes, rng, brain, sizes: tuple, reach: float):
    """A tumour inside the brain: an ellipsoid of random size (a fraction in ``sizes`` of the head),
    place (its centre within ``reach`` of the head's radius) and shape, its radius perturbed by
    low-order harmonics of direction. Returns the tumour, the normalised radius and the perturbed
    boundary (``radius < wobble`` is the tumour), for drawing rims and oedema."""
    size = rng.uniform(*sizes)
    axes = head_axes * size * rng.uniform(0.7, 1.3, 3)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    where = centre + direction * head_axes * rng.uniform(0.0, reach - size)
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    delta = [(g - c) / a for g, c, a in zip(grids, where, axes)]
    radius = np.sqrt(delta[0] ** 2 + delta[1] ** 2 + delta[2] ** 2)
    wobble = 1.0
    for _ in range(3):
        weights = rng.normal(0, 0.12, 3)
        wobble = wobble + np.sin(sum(w * d * rng.uniform(2, 5) for w, d in zip(weights, delta))) * 0.15
    tumour = (radius < wobble) & brain
    if not tumour.any():  # a tiny tumour can vanish after intersecting with the brain
        index = tuple(np.clip(np.round(where).astype(int), 0, np.asarray(shape) - 1))
        tumour[index] = True
    return tumour, radius, wobble


def make_phantom(shape: tuple[int, int, int], rng: np.random.Generator,
                 noise: float = 0.04, healthy: bool = False) -> Phantom:
    """One synthetic head of ``shape`` ``(D, H, W)`` voxels.

    Args:
        shape: volume size; the head fills most of it.
        rng: the generator every random choice is drawn from.
        noise: noise standard deviation as a fraction of white-matter intensity.
        healthy: no tumour (the mask is empty); the head is the one the same ``rng`` gives with one.
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

    tumour, radius, wobble = _blob(shape, centre, head_axes, rng, brain, (0.10, 0.32), 0.82)
    if healthy:
        tumour = np.zeros_like(tumour)
        radius = np.full(shape, np.inf)
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


def _egg(shape, centre, head_axes) -> np.ndarray:
    """A factor on the normalised radius that makes the head wider at the back than at the front
    and flatter at the base than at the vertex, as a skull is: an ellipsoid alone is symmetric
    enough that registering two sequences cannot tell its orientation."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    vertical, front_back = ((g - c) / a for g, c, a in zip(grids[:2], centre[:2], head_axes[:2]))
    return (1.0 + 0.10 * front_back) * (1.0 + 0.06 * vertical)


def _folds(shape, rng) -> np.ndarray:
    """Smooth random offsets of the normalised radius (about +-0.06) that fold the grey and white
    matter boundaries like gyri, the same in every sequence of a study: the texture a registration
    of two sequences aligns on. Drawn from a child of ``rng``, which leaves ``rng``'s own draws (the
    lesions, the sequences' gains and noise) what they were before the folds existed."""
    child = rng.spawn(1)[0]
    field = ndimage.gaussian_filter(child.normal(size=shape).astype(np.float32), sigma=max(1.0, min(shape) / 24))
    return field * np.float32(0.06 / max(float(field.std()), 1e-6))


# Multi-sequence studies. Mean intensity of each tissue per sequence (arbitrary scanner units), in
# the order of TISSUES. Their contrasts are those radiologists read: the enhancing rim is bright
# only after contrast (t1c), necrosis is dark on T1 and bright on T2, oedema is bright on T2 and
# FLAIR, CSF is bright on T2 and suppressed on FLAIR, and every lesion is darker than white matter on T1.
TISSUES = ("background", "scalp", "skull", "csf", "grey", "white", "oedema", "necrosis", "enhancing")
APPEARANCE = {
    "t1": (0.0, 700.0, 120.0, 250.0, 560.0, 760.0, 480.0, 300.0, 520.0),
    "t1c": (0.0, 700.0, 120.0, 260.0, 560.0, 760.0, 500.0, 320.0, 1150.0),
    "t2": (0.0, 600.0, 100.0, 1500.0, 800.0, 600.0, 1250.0, 1350.0, 900.0),
    "flair": (0.0, 650.0, 100.0, 180.0, 700.0, 560.0, 1100.0, 600.0, 900.0),
}
SEQUENCES = tuple(APPEARANCE)
# BraTS label values: necrotic / non-enhancing core, peritumoural oedema, enhancing tumour.
NCR, ED, ET = 1, 2, 4
# Kinds of lesion and how often they occur: necrotic core in an enhancing rim (glioblastoma-like),
# non-enhancing (low-grade-like: no enhancing voxel), and solidly enhancing without necrosis.
LESION_KINDS = (("rim", 0.6), ("non_enhancing", 0.25), ("solid", 0.15))


@dataclass(frozen=True)
class Study:
    """Co-registered sequences ``{name: (D, H, W) uint16}`` and their label volume (BraTS values),
    with the slice spacing factor the study was acquired at (1: as generated)."""

    images: dict
    labels: np.ndarray
    thickness: int = 1


def _lesion(shape, centre, head_axes, rng, brain):
    """One lesion's core, enhancing rim and oedema (boolean volumes) of a random kind and size."""
    kind = rng.choice([k for k, _ in LESION_KINDS], p=[p for _, p in LESION_KINDS])
    tumour, radius, wobble = _blob(shape, centre, head_axes, rng, brain, (0.1, 0.3), 0.8)
    if kind == "rim":
        core = tumour & (radius < rng.uniform(0.45, 0.7) * wobble)
        enhancing = tumour & ~core
    elif kind == "non_enhancing":
        core, enhancing = tumour, np.zeros_like(tumour)
    else:
        core, enhancing = np.zeros_like(tumour), tumour
    oedema = (radius < rng.uniform(1.3, 2.0) * wobble) & brain & ~tumour
    return core, enhancing, oedema


def make_study(shape: tuple[int, int, int], rng: np.random.Generator, sequences: tuple = SEQUENCES,
               thickness: int = 1, noise: float = 0.04, healthy: bool = False) -> Study:
    """One synthetic multi-sequence study of ``shape`` ``(D, H, W)`` (before slice thickening).

    One to three lesions of varied kind, size and place (none when ``healthy``); each sequence gets its own scanner gain,
    tissue contrast jitter, smooth bias field and Rician noise. With ``thickness`` k > 1 every k
    slices are averaged into one (a thicker acquisition: partial volume), and the labels keep the
    middle slice of each group.

    Raises:
        ValueError: a sequence this generator has no appearance for.
    """
    unknown = [name for name in sequences if name not in APPEARANCE]
    if unknown:
        raise ValueError(f"no synthetic appearance for sequence(s) {', '.join(unknown)}; known: {', '.join(SEQUENCES)}")
    shape = tuple(int(n) for n in shape)
    centre = np.asarray(shape) / 2.0 + rng.normal(0, 0.02, 3) * np.asarray(shape)
    head_axes = np.asarray(shape) * rng.uniform(0.40, 0.46, 3)
    r = _radius(shape, centre, head_axes) * _egg(shape, centre, head_axes)
    folds = _folds(shape, rng)
    tissue = np.zeros(shape, dtype=np.uint8)
    tissue[r < 1.0] = TISSUES.index("scalp")
    tissue[r < 0.93] = TISSUES.index("skull")
    brain = r < 0.86
    tissue[brain] = TISSUES.index("csf")
    tissue[r + 0.5 * folds < 0.82] = TISSUES.index("grey")
    tissue[r + folds < 0.62] = TISSUES.index("white")
    ventricle_axes = head_axes * np.asarray([0.18, 0.10, 0.22])
    for side in (-1, 1):
        offset = np.asarray([0.0, 0.0, side * 0.12]) * head_axes
        tissue[_radius(shape, centre + offset, ventricle_axes) < 1.0] = TISSUES.index("csf")

    labels = np.zeros(shape, dtype=np.uint8)
    lesions = int(rng.choice([1, 2, 3], p=[0.7, 0.25, 0.05]))
    for _ in range(0 if healthy else lesions):
        core, enhancing, oedema = _lesion(shape, centre, head_axes, rng, brain)
        labels[oedema & (labels == 0)] = ED
        labels[enhancing] = ET
        labels[core] = NCR
    tissue[labels == ED] = TISSUES.index("oedema")
    tissue[labels == NCR] = TISSUES.index("necrosis")
    tissue[labels == ET] = TISSUES.index("enhancing")

    images = {}
    for name in sequences:
        means = np.asarray(APPEARANCE[name], dtype=np.float32) * rng.uniform(0.92, 1.08, len(TISSUES))
        image = means[tissue] * np.float32(rng.uniform(0.7, 1.4))  # scanner gain
        bias = np.ones(shape, dtype=np.float32)
        for axis, n in enumerate(shape):
            profile = 1.0 + 0.1 * np.cos(np.linspace(0, np.pi, n) * rng.uniform(0.5, 1.5) + rng.uniform(0, np.pi))
            bias *= profile.astype(np.float32).reshape([-1 if i == axis else 1 for i in range(3)])
        image *= bias
        sigma = noise * float(means[TISSUES.index("white")])
        real = image + rng.normal(0, sigma, shape).astype(np.float32)
        imaginary = rng.normal(0, sigma, shape).astype(np.float32)
        images[name] = np.sqrt(real * real + imaginary * imaginary)
    if thickness > 1:
        depth = shape[0] // thickness * thickness
        images = {name: image[:depth].reshape(-1, thickness, *shape[1:]).mean(axis=1) for name, image in images.items()}
        labels = labels[thickness // 2:depth:thickness]
    return Study({name: np.clip(image, 0, 65535).astype(np.uint16) for name, image in images.items()}, labels,
                 thickness)
