"""Semi-real brain studies: real adult anatomy, synthetic sequences, tumours of several kinds.

Anatomy: the ICBM152 2009a T1 and its grey- and white-matter maps (nilearn's copies, 1 mm), moved
per study (rotation up to 10°, scale 0.9-1.1, shift up to 6 mm) and sampled at 1 mm across slices
and 1.5 mm in plane; cerebrospinal fluid is the brain's remainder. T1 is the template's own
intensities; T1c, T2 and FLAIR come from the tissue maps with their usual contrasts. Each study
draws its own gain per sequence, a smooth bias field, Rician noise and a lesion *conspicuity*
(how far lesion intensities move from the tissue they replace: 0.55-1.0).

Lesions are irregular (a thresholded smooth random field around a centre in the white or grey
matter) and of five types, each recorded so that detection can be counted per type:

  rim            enhancing rim (4) around necrosis (1), oedema (2) around most
  solid          solid enhancing (4), oedema around some
  non-enhancing  non-enhancing core (1): dark on T1, grey-matter-like on T1c, bright on T2/FLAIR;
                 oedema around most
  flair-only     oedema-like infiltration (2) brighter only on FLAIR; T1, T1c and T2 unchanged
  t1c-only       an enhancing nodule (4) brighter only on T1c, no oedema

``--kind`` sets the mix: ``mixed`` (every type, one to four lesions, a third of them small),
``glioma`` (mostly one large rim or non-enhancing tumour), ``metastases`` (several small
enhancing nodules) and ``one-sequence`` (mostly lesions visible in one sequence only, FLAIR or T1c,
the FLAIR-only ones as bright on FLAIR as oedema: the designed check of sequence importance). Small lesions are 3.5-7 mm in radius (mostly under 2 ml with their oedema),
the others 8-22 mm. Not labelled, and there to be mistaken for tumour: enhancing vessels (thin
tubes bright on T1c) in every study and, in some, small white-matter hyperintensities (bright on
T2 and FLAIR). Slices are averaged into 1-4 mm (partial volume); labels are the nearest slice's.
BraTS labels: 1 necrosis / non-enhancing core, 2 oedema, 4 enhancing tumour.
"""

from __future__ import annotations

import functools
import importlib.resources
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

SEQUENCES = ("t1c", "t1", "t2", "flair")
FINE_MM = (1.0, 1.5, 1.5)  # (z, y, x) of the grid studies are drawn on before thick slices are averaged
THICKNESSES = (1.0, 1.5, 2.0, 3.0, 4.0)  # mm
TYPES = ("rim", "solid", "non-enhancing", "flair-only", "t1c-only")
# Per kind: the probability of each lesion type (TYPES order), of 1, 2, 3, 4 lesions, and of a small lesion.
KINDS = {
    "mixed": ((0.3, 0.15, 0.2, 0.2, 0.15), (0.45, 0.3, 0.15, 0.1), 0.35),
    "glioma": ((0.5, 0.1, 0.25, 0.15, 0.0), (0.7, 0.2, 0.1, 0.0), 0.15),
    "metastases": ((0.25, 0.4, 0.0, 0.0, 0.35), (0.2, 0.3, 0.3, 0.2), 0.6),
    "one-sequence": ((0.1, 0.1, 0.1, 0.35, 0.35), (0.4, 0.3, 0.2, 0.1), 0.25),
}
# Tissue codes of the lesion map, and their BraTS labels.
OEDEMA, NECROSIS, ENHANCING, CORE, FLAIR_ONLY, T1C_ONLY = 1, 2, 3, 4, 5, 6
LABEL_OF_CODE = np.array([0, 2, 1, 4, 1, 2, 4], dtype=np.uint8)
# Mean intensity per code and sequence, relative to white matter (None: the tissue's own times a factor).
CONTRAST = {  # csf, grey, white | oedema, necrosis, enhancing, non-enhancing core
    "t1c": ((0.25, 0.75, 1.0), (0.72, 0.35, 1.45, 0.72)),
    "t1": ((0.3, 0.75, 1.0), (0.74, 0.35, 0.80, 0.62)),
    "t2": ((1.0, 0.55, 0.40), (0.78, 0.95, 0.60, 0.75)),
    "flair": ((0.15, 0.55, 0.45), (0.72, 0.45, 0.62, 0.70)),
}
FLAIR_ONLY_FACTOR = 1.45  # flair-only lesions: FLAIR 45% above the tissue they replace
# one-sequence studies: their FLAIR-only lesions are as bright on FLAIR as oedema (80% above white
# matter at full conspicuity), so that a network can learn them from FLAIR alone
FLAIR_ONLY_FACTORS = {"one-sequence": 1.8}


@dataclass(frozen=True)
class Study:
    """One study: ``images`` ``{sequence: int16 (D, H, W)}``, BraTS ``labels`` (uint8), ``spacing``
    ``(dz, dy, dx)`` mm, ``lesions`` (uint8: lesion number k + 1 where lesion k is, 0 elsewhere) and
    each lesion's type, in number order."""

    images: dict
    labels: np.ndarray
    spacing: tuple
    lesions: np.ndarray
    types: tuple


@functools.lru_cache(maxsize=1)
def templates() -> dict[str, np.ndarray]:
    """The T1, GM and WM maps as ``(z, y, x)`` float32 in [0, 1], 1 mm."""
    import nibabel

    base = importlib.resources.files("nilearn") / "datasets" / "data"
    maps = {}
    for name in ("t1", "gm", "wm"):
        volume = np.asarray(nibabel.load(str(base / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz")).dataobj)
        maps[name] = np.ascontiguousarray(volume.transpose(2, 1, 0)[:, ::-1], dtype=np.float32) / 255.0
    return maps


def _moved(maps: dict, rng: np.random.Generator) -> dict:
    """Every map rotated, scaled and shifted by one random transform, sampled on ``FINE_MM``."""
    rotation = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(rng.uniform(-10, 10, 3))):
        c, s = np.cos(angle), np.sin(angle)
        turn = np.eye(3)
        i, j = [a for a in range(3) if a != axis]
        turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
        rotation = rotation @ turn
    matrix = rotation / rng.uniform(0.9, 1.1) @ np.diag(FINE_MM)  # output voxel -> template mm (= voxel)
    shape = tuple(int(n / mm) for n, mm in zip(maps["t1"].shape, FINE_MM))
    centre_in, centre_out = (np.asarray(maps["t1"].shape) - 1) / 2, (np.asarray(shape) - 1) / 2
    offset = centre_in - matrix @ centre_out + rng.uniform(-6, 6, 3)
    return {name: ndimage.affine_transform(volume, matrix, offset, output_shape=shape, order=1)
            for name, volume in maps.items()}


def _blob(shape: tuple, centre: np.ndarray, radius_mm: float, rng: np.random.Generator) -> np.ndarray:
    """An irregular blob about ``radius_mm`` across around ``centre`` (voxels of ``FINE_MM``)."""
    axes = [(np.arange(n) - c) * mm for n, c, mm in zip(shape, centre, FINE_MM)]
    z, y, x = np.meshgrid(*axes, indexing="ij", sparse=True)
    distance = np.sqrt(z * z + y * y + x * x) / radius_mm
    field = ndimage.gaussian_filter(rng.normal(size=shape), [max(radius_mm / 3 / mm, 1.0) for mm in FINE_MM])
    field /= field.std() + 1e-8
    return distance + 0.25 * field < 1.0


def _lesion(kind: str, radius_mm: float, shape: tuple, centre: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Tissue codes of one lesion of type ``kind`` in a box of ``shape``."""
    region = np.zeros(shape, dtype=np.uint8)
    core = _blob(shape, centre, radius_mm, rng)
    small = radius_mm < 8
    if kind in ("flair-only", "t1c-only"):
        region[core] = FLAIR_ONLY if kind == "flair-only" else T1C_ONLY
        return region
    if rng.random() < {"rim": 0.85, "solid": 0.5, "non-enhancing": 0.7}[kind] * (0.4 if small else 1.0):
        region[_blob(shape, centre, radius_mm * rng.uniform(1.3, 2.0), rng)] = OEDEMA
    if kind == "rim" and not small:
        region[core] = ENHANCING
        region[_blob(shape, centre, radius_mm * rng.uniform(0.5, 0.75), rng)] = NECROSIS
    else:
        region[core] = CORE if kind == "non-enhancing" else ENHANCING
    return region


def _lesions(brain: np.ndarray, tissue: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple]:
    """``(codes, numbers, types)``: the tissue code of every lesion voxel, which lesion it belongs to
    (1-based) and each lesion's type."""
    type_p, count_p, small_p = KINDS[kind]
    codes = np.zeros(brain.shape, dtype=np.uint8)
    numbers = np.zeros(brain.shape, dtype=np.uint8)
    inner = ndimage.binary_erosion(brain, iterations=8) & (tissue > 0.6)
    candidates = np.argwhere(inner)
    types = []
    for number in range(1, 1 + rng.choice(len(count_p), p=count_p) + 1):
        lesion_type = str(rng.choice(TYPES, p=type_p))
        radius = rng.uniform(3.5, 7.0) if rng.random() < small_p else rng.uniform(8.0, 22.0)
        centre = candidates[rng.integers(len(candidates))].astype(float)
        reach = [int(np.ceil(2.6 * radius / mm)) for mm in FINE_MM]
        box = tuple(slice(max(0, int(c) - r), min(n, int(c) + r + 1)) for c, r, n in zip(centre, reach, brain.shape))
        region = _lesion(lesion_type, radius, tuple(b.stop - b.start for b in box), centre - [b.start for b in box], rng)
        region[~brain[box]] = 0
        stronger = region > codes[box]  # a lesion overlapping another keeps the more severe code
        codes[box][stronger] = region[stronger]
        numbers[box][stronger] = number
        types.append(lesion_type)
    return codes, numbers, tuple(types)


def _vessels(brain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A few thin winding tubes (radius about 1 mm) inside the brain: enhancing vessels on T1c."""
    points = np.zeros(brain.shape, dtype=bool)
    candidates = np.argwhere(ndimage.binary_erosion(brain, iterations=4))
    for _ in range(rng.integers(3, 8)):
        position = candidates[rng.integers(len(candidates))].astype(float)
        direction = rng.normal(size=3)
        for _ in range(rng.integers(30, 90)):
            direction = direction / np.linalg.norm(direction) + rng.normal(0, 0.25, 3)
            position = position + direction / np.linalg.norm(direction) / np.asarray(FINE_MM)
            voxel = tuple(int(round(p)) for p in position)
            if not all(0 <= v < n for v, n in zip(voxel, brain.shape)) or not brain[voxel]:
                break
            points[voxel] = True
    return ndimage.binary_dilation(points)


def _hyperintensities(brain: np.ndarray, white: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Small white-matter hyperintensities (radius 1.5-3 mm) in some studies, bright on T2 and FLAIR."""
    spots = np.zeros(brain.shape, dtype=bool)
    if rng.random() >= 0.4:
        return spots
    candidates = np.argwhere((white > 0.8) & brain)
    for _ in range(rng.integers(2, 9)):
        centre = candidates[rng.integers(len(candidates))].astype(float)
        radius = rng.uniform(1.5, 3.0)
        reach = [int(np.ceil(2 * radius / mm)) + 1 for mm in FINE_MM]
        box = tuple(slice(max(0, int(c) - r), min(n, int(c) + r + 1)) for c, r, n in zip(centre, reach, brain.shape))
        spots[box] |= _blob(tuple(b.stop - b.start for b in box), centre - [b.start for b in box], radius, rng)
    return spots & brain


def make_study(kind: str, rng: np.random.Generator) -> Study:
    """One semi-real study of ``kind`` (a key of :data:`KINDS`)."""
    moved = _moved(templates(), rng)
    grey, white = moved["gm"], moved["wm"]
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(grey + white > 0.3, iterations=3))
    csf = np.clip(brain - grey - white, 0, 1)
    codes, numbers, types = _lesions(brain, grey + white, kind, rng)
    vessels, spots = _vessels(brain, rng), _hyperintensities(brain, white, rng)
    conspicuity = rng.uniform(0.55, 1.0)
    images = {}
    for sequence in SEQUENCES:
        normal, lesion_values = CONTRAST[sequence]
        if sequence == "t1":
            tissue = moved["t1"] / max(float(np.percentile(moved["t1"][white > 0.9], 50)), 1e-3)
        else:
            tissue = csf * normal[0] + grey * normal[1] + white * normal[2]
        targets = {code: value * rng.uniform(0.92, 1.08) for code, value in zip(
            (OEDEMA, NECROSIS, ENHANCING, CORE), lesion_values)}
        if sequence == "flair":
            targets[FLAIR_ONLY] = FLAIR_ONLY_FACTORS.get(kind, FLAIR_ONLY_FACTOR)
        if sequence == "t1c":
            targets[T1C_ONLY] = targets[ENHANCING]
        volume = tissue.copy()
        for code, target in targets.items():  # each lesion voxel moved from its tissue towards its target
            where = codes == code
            aim = tissue[where] * target if code == FLAIR_ONLY else target
            volume[where] = tissue[where] + conspicuity * (aim - tissue[where])
        if sequence == "t1c":
            volume = np.where(vessels, rng.uniform(1.3, 1.6), volume)
        if sequence in ("t2", "flair"):
            volume = np.where(spots, volume * 1.4, volume)
        blurred = ndimage.gaussian_filter(volume, 0.7)
        volume = np.where((codes > 0) | vessels | spots, blurred, volume)  # soft borders
        volume = volume * brain * rng.uniform(0.7, 1.4) * _bias(volume.shape, rng)
        noise = rng.uniform(0.025, 0.06)
        images[sequence] = np.hypot(volume + rng.normal(0, noise, volume.shape), rng.normal(0, noise, volume.shape))
    thickness = float(rng.choice(THICKNESSES))
    starts = np.arange(0, codes.shape[0] - thickness, thickness)
    nearest = np.minimum(np.round(starts + thickness / 2 - 0.5).astype(int), codes.shape[0] - 1)
    thick = {name: np.stack([_slab(volume, z, thickness) for z in starts]) for name, volume in images.items()}
    scale = 1000.0 / max(float(np.percentile(thick["t1"], 99)), 1e-3)
    return Study(images={name: np.clip(volume * scale, 0, 32000).astype(np.int16) for name, volume in thick.items()},
                 labels=LABEL_OF_CODE[codes[nearest]], spacing=(thickness, *FINE_MM[1:]), lesions=numbers[nearest],
                 types=types)


def _slab(volume: np.ndarray, start: float, step: float) -> np.ndarray:
    """The mean of the fine slices a thick slice from ``start`` covers (partial volume)."""
    first, last = int(np.floor(start)), int(np.ceil(start + step))
    return volume[first:max(last, first + 1)].mean(0)


def _bias(shape: tuple, rng: np.random.Generator) -> np.ndarray:
    axes = [np.linspace(-1, 1, n) for n in shape]
    z, y, x = np.meshgrid(*axes, indexing="ij", sparse=True)
    a = rng.uniform(-0.2, 0.2, 3)
    return (1 + a[0] * z + a[1] * y + a[2] * x).astype(np.float32)
