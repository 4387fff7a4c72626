"""A series read through its own geometry onto another series' voxel grid.

A study's sequences need not share a grid: a 3D T1c at 1 mm sagittal, a 2D axial FLAIR at 5 mm,
a T2 with another matrix and field of view, an oblique stack. When they share a frame of
reference (FrameOfReferenceUID: one patient position in the scanner), each voxel's position in
patient coordinates (mm) follows from its series' ImagePositionPatient, ImageOrientationPatient,
PixelSpacing and slice spacing, and :class:`Aligned` reads a series where a region of the
*reference* grid lies: the bounding box of that region in the series' own voxels by the ranged
reads every series has, interpolated linearly (labels: the nearest voxel) at the reference
voxels' positions. Reference voxels outside the series' field of view read as zero; those within
half a voxel of its edge take the edge voxel, as the slice covers them.

Stacks whose axes are parallel to the reference's (any permutation and direction: axial against
sagittal or coronal, other spacings, origins and matrices) are interpolated one axis at a time;
an oblique stack by :func:`scipy.ndimage.map_coordinates`, a few reference slices at a time so
the bounding box it reads stays small. With the host's cache on (:mod:`brainseg.io.cache`), what
was resampled is kept there in tiles of :data:`TILE_SLICES` whole reference slices (named by the
source objects' keys and ETags and the reference grid), so from the second epoch a read costs what
a read of a co-registered series does; without it, every read resamples.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from brainseg.data.registration import Registration
from brainseg.data.series import Volume, object_identity
from brainseg.io import cache

PARALLEL_TOLERANCE = 1e-4  # a direction cosine this close to 0 counts as 0: the axes are parallel
OBLIQUE_CHUNK_SLICES = 8  # reference slices an oblique read interpolates at once
TILE_SLICES = 8  # reference slices of one resampled tile kept in the host's cache
TILE_VERSION = 1  # part of a tile's name: a change in how tiles are computed names new ones
COVERAGE_SAMPLES = 24  # points per axis of the lattice :meth:`Aligned.coverage` checks
PLANE_TOLERANCE = 1e-3  # a slice normal within this of a patient axis names the plane; else "oblique"
PLANES = ("sagittal", "coronal", "axial")  # the slice normal along patient x, y, z


def nearest(coordinates: np.ndarray) -> np.ndarray:
    """The index nearest each continuous coordinate, ties up (the rule labels, separate-z slices and
    the way back share, so a region always agrees with the whole volume)."""
    return np.floor(coordinates + 0.5 + 1e-6)


def voxel_to_patient(grid: tuple) -> np.ndarray:
    """The 4x4 matrix taking a voxel index ``(z, y, x, 1)`` to patient coordinates (mm) for a grid
    given as ``(spacing (dz, dy, dx), origin, orientation (row cosines, column cosines))``: x runs
    along a row, y down a column, z along their cross product (the order the slices are sorted in)."""
    spacing, origin, orientation = grid
    row = np.asarray(orientation[:3], dtype=float)
    column = np.asarray(orientation[3:], dtype=float)
    normal = np.cross(row, column)
    matrix = np.eye(4)
    matrix[:3, 0] = normal * spacing[0]
    matrix[:3, 1] = column * spacing[1]
    matrix[:3, 2] = row * spacing[2]
    matrix[:3, 3] = origin
    return matrix


def centre_of(volume) -> np.ndarray:
    """The patient position (mm) of the middle voxel of ``volume`` (a series' grid and ``shape``)."""
    middle = (np.asarray(volume.shape, dtype=float) - 1) / 2
    return (voxel_to_patient(grid_of(volume)) @ np.append(middle, 1.0))[:3]


def plane_of(orientation: tuple) -> str:
    """The plane a stack's slices lie in (``axial``, ``sagittal``, ``coronal``), or ``oblique``."""
    normal = np.abs(np.cross(orientation[:3], orientation[3:]))
    axis = int(np.argmax(normal))
    return PLANES[axis] if normal[axis] >= 1 - PLANE_TOLERANCE else "oblique"


def grid_of(volume) -> tuple:
    """``(spacing, origin, orientation)`` of a series (what :func:`voxel_to_patient` takes)."""
    return tuple(volume.spacing), tuple(volume.origin), tuple(volume.orientation)


@dataclass(frozen=True)
class InMemory(Volume):
    """A ``(D, H, W)`` array on a grid (``spacing``, ``origin``, ``orientation`` as a series has them)."""

    values: np.ndarray
    spacing: tuple
    origin: tuple
    orientation: tuple

    what = "array"

    @property
    def shape(self) -> tuple:
        return tuple(self.values.shape)

    @property
    def bytes_per_voxel(self) -> int:
        return self.values.itemsize

    def read_region(self, z0: int, z1: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        self._check_region((z0, z1, y0, y1, x0, x1))
        return self.values[z0:z1, y0:y1, x0:x1].astype(np.float32)


def labels_onto(values: np.ndarray, grid, target, registration: Registration | None = None) -> np.ndarray:
    """A label array on ``grid``'s voxels (any volume with ``spacing``/``origin``/``orientation``) on
    ``target``'s voxels (a series of the same frame of reference, or of another one that
    ``registration`` placed on ``grid``): nearest voxel, 0 outside ``grid``."""
    source = InMemory(values, *grid_of(grid))
    depth, rows, columns = target.shape
    onto = Aligned(source, target.shape, target.spacing, target.origin, target.orientation, labels=True,
                   registration=registration.inverted() if registration is not None else None)
    return onto.resample((0, depth, 0, rows, 0, columns)).astype(values.dtype)


class Aligned(Volume):
    """``source`` (a :class:`~brainseg.data.series.Series` of the same frame of reference, or of
    another one with its ``registration``) read on the reference grid
    ``shape``/``spacing``/``origin``/``orientation``, as float32 (``labels``: nearest voxel, else
    linear). Answers ``read_region`` and ``read_volume`` as a series does; ``native`` is the source,
    whose own slices give its intensity statistics."""

    what = "resampled series"

    def __init__(self, source, shape: tuple, spacing: tuple, origin: tuple, orientation: tuple,
                 labels: bool = False, registration: Registration | None = None):
        self.source = source
        self.shape = tuple(int(v) for v in shape)
        self.spacing, self.origin, self.orientation = tuple(spacing), tuple(origin), tuple(orientation)
        self.labels = labels
        self.registration = registration
        self._coverage: float | None = None
        # reference voxel (z, y, x, 1) -> reference patient mm -> (registered) source patient mm -> source voxel
        moved = registration.transform if registration is not None else np.eye(4)
        self.matrix = np.linalg.inv(voxel_to_patient(grid_of(source))) @ moved @ voxel_to_patient(
            (self.spacing, self.origin, self.orientation))
        linear = self.matrix[:3, :3]
        significant = np.abs(linear) > PARALLEL_TOLERANCE * np.abs(linear).max(axis=1, keepdims=True)
        self.axes = (tuple(int(np.flatnonzero(row)[0]) for row in significant)
                     if (significant.sum(axis=1) == 1).all() and (significant.sum(axis=0) == 1).all() else None)
        identity = "\0".join([str(TILE_VERSION), str(labels), repr((self.shape, self.spacing, self.origin, self.orientation)),
                               *object_identity(source), *filter(None, [getattr(source, "variant", "")]),
                               *([repr(registration.matrix)] if registration is not None else [])])
        self.name = "aligned-" + hashlib.sha256(identity.encode()).hexdigest()[:32]

    @property
    def native(self):
        return self.source

    @property
    def parallel(self) -> bool:
        """The source's axes are parallel to the reference's (in some order and direction)."""
        return self.axes is not None

    @property
    def bytes_per_voxel(self) -> int:
        """Memory one reference voxel of a read costs, at most: the source voxels of the box read for
        it, raw and decoded, and the interpolated value."""
        return int(math.ceil(self.expansion() * (self.source.bytes_per_voxel + 4))) + 4

    @property
    def headers(self) -> tuple:
        return self.source.headers

    @property
    def etags(self) -> tuple:
        return self.source.etags

    def expansion(self) -> float:
        """Source voxels read per reference voxel, at most: the density of the source's voxels in the
        reference's, times the growth of a box's bounding box under the rotation between them (for
        an oblique stack, of the :data:`OBLIQUE_CHUNK_SLICES`-slice boxes it reads at a time, spanning
        the reference's rows and columns), plus a voxel of interpolation margin on each side."""
        linear = np.abs(self.matrix[:3, :3])
        if self.parallel:
            box = np.asarray([min(s, 32) for s in self.shape], dtype=float)
        else:
            box = np.asarray([min(OBLIQUE_CHUNK_SLICES, self.shape[0]), *self.shape[1:]], dtype=float)
        covered = np.minimum(linear @ box + 2, np.asarray(self.source.shape, dtype=float))
        return max(1.0, float(np.prod(covered) / np.prod(box)))

    def describe(self) -> str:
        """The source's grid and how much of the reference it covers, e.g. ``sagittal 16x12x30 at
        1x2x1 mm, covers 87 %``, and how it was registered when it was."""
        shape = "x".join(map(str, self.source.shape))
        spacing = "x".join(f"{v:.3g}" for v in self.source.spacing)
        registered = ""
        if self.registration is not None:
            registered = f", registered from another frame ({self.registration.describe(centre_of(self))})"
        return (f"{plane_of(self.source.orientation)} {shape} at {spacing} mm, covers {100 * self.coverage():.0f} %"
                f"{registered}")

    def to_source(self, points: np.ndarray) -> np.ndarray:
        """Reference voxel coordinates ``(N, 3)`` as source voxel coordinates."""
        return points @ self.matrix[:3, :3].T + self.matrix[:3, 3]

    def coverage(self) -> float:
        """The fraction of the reference grid inside the source's field of view (on a lattice of
        :data:`COVERAGE_SAMPLES` points per axis; computed once)."""
        if self._coverage is None:
            axes = [np.linspace(0, size - 1, min(size, COVERAGE_SAMPLES)) for size in self.shape]
            points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
            self._coverage = float(self._inside(self.to_source(points)).mean())
        return self._coverage

    def _inside(self, coordinates: np.ndarray) -> np.ndarray:
        """Which source coordinates ``(..., 3)`` lie within half a voxel of the source's voxels."""
        limits = np.asarray(self.source.shape, dtype=float) - 0.5
        return ((coordinates >= -0.5) & (coordinates <= limits)).all(axis=-1)

    def read_region(self, z0: int, z1: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The reference voxels ``[z0:z1, y0:y1, x0:x1]`` as float32: from the host's cache's tiles,
        or resampled from the source (and kept) where a tile is not there."""
        self._check_region((z0, z1, y0, y1, x0, x1))
        if cache.active() is None:
            return self.resample((z0, z1, y0, y1, x0, x1))
        depth, rows, columns = self.shape
        parts = []
        for tile in range(z0 // TILE_SLICES, (z1 - 1) // TILE_SLICES + 1):
            low, high = tile * TILE_SLICES, min((tile + 1) * TILE_SLICES, depth)
            data = cache.derived(self.name, tile, lambda low=low, high=high: self.resample(
                (low, high, 0, rows, 0, columns)).tobytes())
            whole = np.frombuffer(data, dtype=np.float32).reshape(high - low, rows, columns)
            parts.append(whole[max(z0, low) - low:min(z1, high) - low, y0:y1, x0:x1])
        return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()

    def requests(self, region: tuple) -> list[tuple]:
        """The source's whole volume: the most a read of ``region`` may fetch (its tiles are
        resampled from source boxes that depend on the geometry, then kept in the host's cache)."""
        self._check_region(tuple(region))
        return self.source.requests(self.source.whole)

    def resample(self, region: tuple) -> np.ndarray:
        """The reference voxels of ``region`` ``(z0, z1, y0, y1, x0, x1)`` resampled from the source."""
        z0, z1, y0, y1, x0, x1 = region
        if self.parallel:
            return self._read_parallel((z0, z1, y0, y1, x0, x1))
        return np.concatenate([self._read_oblique((z, min(z + OBLIQUE_CHUNK_SLICES, z1), y0, y1, x0, x1))
                               for z in range(z0, z1, OBLIQUE_CHUNK_SLICES)])

    def _read_parallel(self, region: tuple) -> np.ndarray:
        """Axis by axis: each source axis follows one reference axis, so its coordinates form one vector."""
        shape = tuple(high - low for low, high in zip(region[0::2], region[1::2]))
        coordinates, inside, bounds = [], [], []
        for axis in range(3):  # source axis
            along = self.axes[axis]  # the reference axis it follows
            indices = np.arange(region[2 * along], region[2 * along + 1], dtype=float)
            values = self.matrix[axis, along] * indices + self.matrix[axis, 3]
            valid = (values >= -0.5) & (values <= self.source.shape[axis] - 0.5)
            if not valid.any():
                return np.zeros(shape, dtype=np.float32)
            values = np.clip(values, 0, self.source.shape[axis] - 1)
            low = int(math.floor(values[valid].min()))
            high = min(self.source.shape[axis], int(math.floor(values[valid].max())) + 2)
            coordinates.append(values - low)
            inside.append(valid)
            bounds += [low, high]
        block = self.source.read_region(*bounds)
        for axis in range(3):
            block = self._interpolate_axis(block, coordinates[axis], axis)
            block *= np.expand_dims(inside[axis], tuple(a for a in range(3) if a != axis))
        # block axis a follows reference axis self.axes[a]; put the reference's order back
        return np.ascontiguousarray(block.transpose(np.argsort(self.axes)), dtype=np.float32)

    def _interpolate_axis(self, block: np.ndarray, coordinates: np.ndarray, axis: int) -> np.ndarray:
        size = block.shape[axis]
        if self.labels:
            picks = np.clip(nearest(coordinates).astype(int), 0, size - 1)
            return np.take(block, picks, axis=axis)
        below = np.clip(np.floor(coordinates).astype(int), 0, size - 1)
        above = np.minimum(below + 1, size - 1)
        weight = np.expand_dims((coordinates - below).astype(np.float32), tuple(a for a in range(3) if a != axis))
        low = np.take(block, below, axis=axis)
        return low + (np.take(block, above, axis=axis) - low) * weight

    def _read_oblique(self, region: tuple) -> np.ndarray:
        """Every reference voxel's source coordinates, interpolated in the box that holds them."""
        axes = [np.arange(low, high, dtype=float) for low, high in zip(region[0::2], region[1::2])]
        points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
        coordinates = self.to_source(points.reshape(-1, 3)).reshape(*points.shape)
        inside = self._inside(coordinates)
        out = np.zeros(points.shape[:3], dtype=np.float32)
        if not inside.any():
            return out
        limits = np.asarray(self.source.shape) - 1
        coordinates = np.clip(coordinates, 0, limits)
        held = coordinates[inside]
        low = np.floor(held.min(axis=0)).astype(int)
        high = np.minimum(np.floor(held.max(axis=0)).astype(int) + 2, np.asarray(self.source.shape))
        block = self.source.read_region(*(int(v) for pair in zip(low, high) for v in pair))
        local = (held - low).T
        if self.labels:
            out[inside] = block[tuple(np.clip(nearest(local).astype(int), 0, np.asarray(block.shape)[:, None] - 1))]
        else:
            out[inside] = ndimage.map_coordinates(block, local, order=1, mode="nearest")
        return out
