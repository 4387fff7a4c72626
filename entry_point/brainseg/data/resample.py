"""Physical spacing: a case's native voxel grid and the target grid the network works on.

Training and inference run on a grid of ``target spacing`` mm (by default the training cases'
median spacing, as nnU-Net chooses), so a patch covers the same millimetres in every case
whatever its slice thickness. The stream reads the native region that covers a target slab (plus
one voxel for interpolation) and resamples it; evaluation resamples a case to the target grid,
infers there and maps the network's output back to the native grid, where Dice is counted.
Labels are resampled by nearest neighbour (by index), images linearly (torch), each axis by its own
factor. Thick slices follow nnU-Net's ``separate z`` rule (``resampling="separate_z"``): where the
case's spacing, or else the target's, is anisotropic (coarsest axis more than
:data:`ANISOTROPY` times the finest), that axis takes the nearest native slice and only the plane
is interpolated, so no slice is blended from two slices millimetres apart; the network's output
goes back the same way. ``linear`` interpolates every axis. A case already at the target spacing is
never resampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from brainseg.data.geometry import nearest
from brainseg.data.summary import Points

SAME_SPACING = 1e-3  # relative: closer than this to the target counts as the target spacing
ANISOTROPY = 3.0  # nnU-Net's: a spacing whose coarsest axis is more than this times its finest is anisotropic


def coarse_axis(spacing: tuple) -> int | None:
    """The axis of an anisotropic ``spacing`` that is coarser than the rest (``None``: isotropic enough)."""
    if not spacing or max(spacing) <= ANISOTROPY * min(spacing):
        return None
    return int(np.argmax(spacing))


@dataclass(frozen=True)
class Grid:
    """A case's native grid, its target spacing (``(dz, dy, dx)`` mm) and how images move between them."""

    native_shape: tuple
    native_spacing: tuple
    target_spacing: tuple
    resampling: str = "linear"

    @property
    def nearest_axis(self) -> int | None:
        """The axis images are resampled along by nearest slice (``separate_z`` on anisotropic data)."""
        if self.resampling != "separate_z" or self.identity:
            return None
        axis = coarse_axis(self.native_spacing)
        return axis if axis is not None else coarse_axis(self.target_spacing)

    @property
    def factors(self) -> tuple:
        """Target voxels per native voxel along each axis."""
        return tuple(n / t for n, t in zip(self.native_spacing, self.target_spacing))

    @property
    def identity(self) -> bool:
        return all(abs(f - 1.0) <= SAME_SPACING for f in self.factors)

    @property
    def shape(self) -> tuple:
        """The target grid's shape (the same extent in mm)."""
        if self.identity:
            return tuple(self.native_shape)
        return tuple(max(1, int(round(n * f))) for n, f in zip(self.native_shape, self.factors))

    def _native_coordinates(self, axis: int, start: int, stop: int) -> np.ndarray:
        """Native (continuous) coordinates of target voxels ``start..stop-1`` along ``axis``."""
        factor = self.native_shape[axis] / self.shape[axis]  # exact extents: no drift at the far end
        return (np.arange(start, stop) + 0.5) * factor - 0.5

    def native_region(self, region: tuple) -> tuple:
        """The native region ``(z0, z1, y0, y1, x0, x1)`` whose voxels a target region needs."""
        if self.identity:
            return tuple(region)
        bounds = []
        for axis in range(3):
            coordinates = self._native_coordinates(axis, region[2 * axis], region[2 * axis + 1])
            low = max(0, int(math.floor(coordinates.min())))
            high = min(self.native_shape[axis], int(math.ceil(coordinates.max())) + 1)
            bounds += [low, max(high, low + 1)]
        return tuple(bounds)

    def to_target(self, volume: np.ndarray, native_region: tuple, region: tuple, labels: bool = False) -> np.ndarray:
        """``volume`` (the native region's voxels, ``(..., D, H, W)``) resampled onto the target
        region ``region``."""
        if self.identity:
            return volume
        coordinates = [self._native_coordinates(axis, region[2 * axis], region[2 * axis + 1]) for axis in range(3)]
        if labels:  # the nearest native voxel, ties up, by index: a region agrees with the whole volume exactly
            picks = [np.clip(nearest(c).astype(int), 0, self.native_shape[axis] - 1)
                     - native_region[2 * axis] for axis, c in enumerate(coordinates)]
            return volume[..., picks[0], :, :][..., picks[1], :][..., picks[2]]
        if self.nearest_axis is not None:
            coordinates[self.nearest_axis] = nearest(coordinates[self.nearest_axis])
        axes = []
        for axis in range(3):
            low, high = native_region[2 * axis], native_region[2 * axis + 1]
            size = high - low
            axes.append(np.clip(coordinates[axis] - low, 0, size - 1) / max(size - 1, 1) * 2 - 1 if size > 1
                        else np.zeros_like(coordinates[axis]))
        z, y, x = np.meshgrid(*axes, indexing="ij")
        grid = torch.from_numpy(np.stack([x, y, z], axis=-1)[None].astype(np.float32))
        lead = volume.shape[:-3]
        data = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)).reshape(1, -1, *volume.shape[-3:])
        out = F.grid_sample(data, grid, mode="bilinear", padding_mode="border", align_corners=True)
        return out[0].reshape(*lead, *out.shape[-3:]).numpy()

    def points_to_target(self, points) -> tuple:
        """Native voxel coordinates ``((z, y, x), ...)`` as the target voxels that hold them."""
        if self.identity or not len(points):
            return points
        native = np.asarray(points, dtype=float)
        scale = np.asarray(self.shape) / np.asarray(self.native_shape)
        target = np.clip(np.floor((native + 0.5) * scale), 0, np.asarray(self.shape) - 1).astype(int)
        return Points(target) if isinstance(points, Points) else tuple(tuple(int(v) for v in point) for point in target)

    def native_slab_shape(self, slab: tuple) -> tuple:
        """The most native voxels a target slab ``(D, H, W)`` needs (the region plus interpolation)."""
        if self.identity:
            return tuple(slab)
        return tuple(min(n, int(math.ceil(s * n / t)) + 2) for s, n, t in zip(slab, self.native_shape, self.shape))

    def volume_to_target(self, volume: np.ndarray, labels: bool = False) -> np.ndarray:
        """A whole native volume ``(..., D, H, W)`` on the target grid."""
        if self.identity:
            return volume
        whole = tuple(v for n in self.native_shape for v in (0, n))
        return self.to_target(volume, whole, tuple(v for n in self.shape for v in (0, n)), labels)

    def volume_to_native(self, output: torch.Tensor) -> torch.Tensor:
        """The network's output ``(C, D, H, W)`` on the target grid, interpolated back onto the native grid."""
        if self.identity:
            return output
        axis = self.nearest_axis
        if axis is None:
            return F.interpolate(output[None].float(), size=tuple(self.native_shape), mode="trilinear",
                                 align_corners=False)[0]
        size = list(self.native_shape)
        size[axis] = output.shape[1 + axis]  # the plane linearly, then the nearest target slice per native one
        planar = F.interpolate(output[None].float(), size=tuple(size), mode="trilinear", align_corners=False)[0]
        slices = torch.from_numpy(self.native_picks(axis)).to(planar.device)
        return planar.index_select(1 + axis, slices)

    def native_picks(self, axis: int) -> np.ndarray:
        """For each native voxel along ``axis``, the target voxel whose centre is nearest."""
        scale = self.shape[axis] / self.native_shape[axis]
        centres = (np.arange(self.native_shape[axis]) + 0.5) * scale - 0.5
        return np.clip(nearest(centres), 0, self.shape[axis] - 1).astype(np.int64)


@dataclass(frozen=True)
class TargetSpacing:
    """The spacing a run's network works at, resolved once per run (training) or read from the model
    (prediction) and passed beside the cases: ``(dz, dy, dx)`` mm, or ``()`` for each case's own, and
    the images' resampling (``separate_z`` or ``linear``, :data:`brainseg.config.RESAMPLINGS`)."""

    spacing: tuple = ()
    resampling: str = "linear"

    def grid(self, shape: tuple, spacing: tuple) -> Grid:
        """The grid of a volume of ``shape`` voxels of ``spacing`` mm."""
        return Grid(tuple(shape), tuple(spacing), tuple(self.spacing) or tuple(spacing), self.resampling)

    def grid_of(self, case) -> Grid:
        """The grid of a catalog case: its first sequence's."""
        return self.grid(case.image.shape, case.image.spacing)


NATIVE = TargetSpacing()


def median_spacing(spacings) -> tuple:
    """The per-axis median of ``(dz, dy, dx)`` spacings."""
    return tuple(float(v) for v in np.median(np.asarray(list(spacings), dtype=float), axis=0))
