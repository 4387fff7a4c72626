"""Rigid registration of a study's sequences that lie in different frames of reference.

Series of one exam share a FrameOfReferenceUID, and their headers say where each voxel lies
(:mod:`brainseg.data.geometry`). A sequence from another session, or acquired after the patient
moved, lies in a frame of its own: its headers place it in the scanner, not relative to the
reference sequence. Such a sequence is registered to the reference once, when the catalog is
built: both whole series are read, averaged down to about :data:`WORKING_SPACING_MM` (SimpleITK's
``BinShrink``), and a rigid transform (``Euler3DTransform``: three rotations about the heads'
centre and a shift) is fitted by Mattes mutual information (a metric for images of different
contrasts), multi-resolution (shrink 4, 2, 1; smoothing 2, 1, 0 mm), regular-step gradient
descent, started from the two volumes' centres of mass. The coarser of the two (the larger voxel
after averaging down, typically a thick-slice FLAIR) is the fixed image the metric samples, and the
finer one is interpolated at its voxels: interpolating between thick slices biases the metric's
optimum by up to a degree or so, interpolating a fine volume hardly at all. A fit the other way
round is inverted. The metric samples only the fixed image's head (its Otsu head grown by
:data:`MASK_MARGIN_VOXELS`): the air around it holds noise, not anatomy.

The result is a 4x4 matrix taking the reference's patient coordinates (mm) to the sequence's;
:class:`~brainseg.data.geometry.Aligned` composes it with the two grids, so the sequence is read
where a patch lies as a sequence of the same frame is. It is checked before it is used: the two
heads (each volume's voxels above its Otsu level, tissue against air, holes filled) must overlap
with a Dice of at least :data:`MIN_HEAD_DICE` within the sequence's field of view, else the case is
excluded with the figures. The check catches gross failures (a series that shows something else,
a fit that ran off); how close a fit comes is measured by ``benchmarks/registration.py`` against
known motions. Results are kept in the header index by the two series' objects
(keys and ETags), so a later job reuses them.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from brainseg.data.series import object_identity

REGISTRATION_VERSION = 2  # part of a result's name: a change in how registration is done names new ones
WORKING_SPACING_MM = 2.0  # volumes are averaged down to about this spacing before registering
HISTOGRAM_BINS = 32  # Mattes mutual information
SAMPLING_FRACTION = 0.5  # of the fixed image's head voxels the metric samples (a fixed seed)
SAMPLING_SEED = 17
MASK_MARGIN_VOXELS = 2  # the metric samples the fixed image's head grown by this much (working voxels)
ITERATIONS = 200  # per resolution level
MIN_HEAD_DICE = 0.8  # the check a registration must pass: it catches gross failures, not millimetres


def rotation_degrees(matrix: np.ndarray) -> float:
    """The angle (degrees) of the rotation in a rigid 4x4 (or 3x3) ``matrix``, about its axis."""
    return math.degrees(math.acos(float(np.clip((np.trace(np.asarray(matrix)[:3, :3]) - 1) / 2, -1.0, 1.0))))


@dataclass(frozen=True)
class Registration:
    """A fitted rigid transform: ``matrix`` (16 numbers, row-major) takes the reference's patient
    coordinates (mm) to the registered sequence's; ``metric`` is the final Mattes mutual
    information (lower is better), ``head_dice`` the heads' overlap after it and
    ``head_dice_before`` with the headers' positions alone."""

    matrix: tuple
    metric: float
    head_dice: float
    head_dice_before: float
    seconds: float

    @property
    def transform(self) -> np.ndarray:
        return np.asarray(self.matrix, dtype=float).reshape(4, 4)

    @property
    def rotation_degrees(self) -> float:
        """The rotation's angle about its axis."""
        return rotation_degrees(self.transform)

    def shift_mm(self, point: np.ndarray) -> float:
        """How far the transform moves ``point`` (patient mm)."""
        return float(np.linalg.norm(self.transform[:3, :3] @ point + self.transform[:3, 3] - point))

    def inverted(self) -> Registration:
        """The same fit the other way: the registered sequence's patient coordinates to the reference's."""
        return Registration(tuple(float(v) for v in np.linalg.inv(self.transform).ravel()), self.metric, self.head_dice,
                            self.head_dice_before, self.seconds)

    @property
    def passed(self) -> bool:
        return self.head_dice >= MIN_HEAD_DICE

    def describe(self, centre: np.ndarray | None = None) -> str:
        """E.g. ``rigid: 7.9° and 11.8 mm at the centre, Mattes MI -0.62, heads overlap 0.97 (0.71 before)``."""
        moved = f" and {self.shift_mm(centre):.1f} mm at the centre" if centre is not None else ""
        return (f"rigid: {self.rotation_degrees:.1f}°{moved}, Mattes MI {self.metric:.3f}, heads overlap "
                f"{self.head_dice:.2f} ({self.head_dice_before:.2f} before)")

    def to_row(self) -> dict:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict) -> Registration:
        return cls(tuple(float(v) for v in row["matrix"]), float(row["metric"]), float(row["head_dice"]),
                   float(row["head_dice_before"]), float(row["seconds"]))


def pair_name(reference, moving) -> str:
    """The name a registration of ``moving`` onto ``reference`` is kept under: both series' objects
    (keys and ETags) and :data:`REGISTRATION_VERSION`."""
    parts = [str(REGISTRATION_VERSION)]
    for series in (reference, moving):
        parts += ["|", *object_identity(series)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _image(volume):
    """``volume`` (a series: ``read_volume``, ``spacing``, ``origin``, ``orientation``) as a SimpleITK
    image in patient coordinates, averaged down to about :data:`WORKING_SPACING_MM`."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(volume.read_volume().astype(np.float32))  # index (x, y, z) = (column, row, slice)
    spacing = tuple(float(v) for v in volume.spacing)  # (dz, dy, dx)
    image.SetSpacing((spacing[2], spacing[1], spacing[0]))
    image.SetOrigin(tuple(float(v) for v in volume.origin))
    row, column = np.asarray(volume.orientation[:3], float), np.asarray(volume.orientation[3:], float)
    image.SetDirection(tuple(np.stack([row, column, np.cross(row, column)], axis=1).ravel()))
    factors = [max(1, int(round(WORKING_SPACING_MM / step))) for step in image.GetSpacing()]
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def otsu_level(array: np.ndarray, bins: int = 256) -> float:
    """The intensity that best splits ``array`` in two (Otsu: the largest variance between the classes)."""
    counts, edges = np.histogram(array, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(counts)[:-1].astype(float)
    above = counts.sum() - below
    mass = np.cumsum(counts * centres)[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = below * above * (mass / below - (mass[-1] + counts[-1] * centres[-1] - mass) / above) ** 2
    return float(edges[1:-1][int(np.nanargmax(between))]) if np.isfinite(between).any() else float(array.mean())


def _head(array: np.ndarray) -> np.ndarray:
    """The head of a volume: voxels above its Otsu level (tissue against air), holes filled."""
    return ndimage.binary_fill_holes(array > otsu_level(array)) if array.size else np.zeros(array.shape, bool)


def _head_dice(fixed, head: np.ndarray, moving, transform) -> float:
    """Dice of the reference's ``head`` (on its working grid ``fixed``) and ``moving``'s head placed
    there by ``transform``, where ``moving`` reaches."""
    import SimpleITK as sitk

    resampled = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0))
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    reach = sitk.GetArrayFromImage(sitk.Resample(ones, fixed, transform, sitk.sitkNearestNeighbor, 0)).astype(bool)
    ours, theirs = head & reach, _head(resampled) & reach
    total = int(ours.sum()) + int(theirs.sum())
    return 2.0 * int((ours & theirs).sum()) / total if total else 0.0


def register(reference, moving) -> Registration:
    """Fit the rigid transform taking ``reference``'s patient coordinates to ``moving``'s (both
    series, or anything with ``read_volume`` and a grid): module docstring."""
    import SimpleITK as sitk

    started = time.perf_counter()
    reference_image, moving_image = _image(reference), _image(moving)
    swapped = _voxel_volume(moving_image) > _voxel_volume(reference_image)
    fixed, floating = (moving_image, reference_image) if swapped else (reference_image, moving_image)
    initial = sitk.CenteredTransformInitializer(fixed, floating, sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(SAMPLING_FRACTION, SAMPLING_SEED)
    method.SetMetricFixedMask(_head_mask(fixed))
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-5, numberOfIterations=ITERATIONS,
                                                    relaxationFactor=0.85, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=False)
    fitted = method.Execute(fixed, floating)
    euler = sitk.Euler3DTransform(sitk.CompositeTransform(fitted).GetNthTransform(0)) \
        if fitted.GetName() == "CompositeTransform" else sitk.Euler3DTransform(fitted)
    rotation = np.asarray(euler.GetMatrix(), dtype=float).reshape(3, 3)
    centre, shift = np.asarray(euler.GetCenter(), float), np.asarray(euler.GetTranslation(), float)
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = centre + shift - rotation @ centre
    if swapped:
        matrix = np.linalg.inv(matrix)
    fit = sitk.AffineTransform(3)
    fit.SetMatrix(tuple(float(v) for v in matrix[:3, :3].ravel()))
    fit.SetTranslation(tuple(float(v) for v in matrix[:3, 3]))
    head = _head(sitk.GetArrayFromImage(reference_image))
    return Registration(tuple(float(v) for v in matrix.ravel()), float(method.GetMetricValue()),
                        round(_head_dice(reference_image, head, moving_image, fit), 4),
                        round(_head_dice(reference_image, head, moving_image, sitk.Euler3DTransform()), 4),
                        round(time.perf_counter() - started, 2))


def _head_mask(image):
    """The head of a SimpleITK ``image`` grown by :data:`MASK_MARGIN_VOXELS`, as a mask on its grid:
    where the metric samples (air carries noise, not anatomy)."""
    import SimpleITK as sitk

    head = ndimage.binary_dilation(_head(sitk.GetArrayFromImage(image)), iterations=MASK_MARGIN_VOXELS)
    mask = sitk.GetImageFromArray(head.astype(np.uint8))
    mask.CopyInformation(image)
    return mask


def _voxel_volume(image) -> float:
    """mm³ of one voxel of a SimpleITK ``image``."""
    return float(np.prod(image.GetSpacing()))


class Registrar:
    """The registrations a catalog needs: looked up among ``saved`` (the header index's, by
    :func:`pair_name`), else fitted (:func:`register`); ``used`` holds every one asked for. With
    ``enabled`` false (``--registration none``) nothing is fitted."""

    def __init__(self, saved: dict | None = None, enabled: bool = True):
        self.saved = dict(saved or {})
        self.enabled = enabled
        self.used: dict[str, Registration] = {}
        self.fitted = 0

    def __call__(self, reference, moving) -> Registration:
        name = pair_name(reference, moving)
        found = self.used.get(name) or self.saved.get(name)
        if found is None:
            found = register(reference, moving)
            self.fitted += 1
        self.used[name] = found
        return found

    def kept(self) -> dict[str, Registration]:
        """What the index keeps for the next job: the registrations this catalog used (those of
        objects since changed or gone are dropped); with registration off, every saved one."""
        return self.used if self.enabled else self.saved
