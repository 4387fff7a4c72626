"""Sequences on grids of their own, as a scanner writes them: the synthetic study's first sequence
and its labels stay on the study's (axial) grid, and every other sequence is resampled from the
same phantom onto a geometry of its own, in the same frame of reference:

- the second: an oblique stack, tilted 12 degrees about the patient's x axis (an AC-PC-aligned T1),
  slices 1.2 times the study's, a larger field of view;
- the third: sagittal, finer in plane (three quarters of the study's row spacing), another matrix;
- the fourth: axial, slices 2.5 times the study's (thick 2D slices with a gap), finer in plane;
- any further one: coronal at the study's spacing.

One sequence may also lie in a frame of reference of its own (:func:`frame_motion`: the patient
re-positioned between acquisitions, turned 5-10 degrees about some axis through the head's centre
and shifted 5-15 mm): its headers place it in the scanner as before, its content moves with the
patient, and the transform the product must recover is returned with it.

Resampling here (not the naming of planes) is the DICOM standard's formula and :func:`scipy.ndimage.map_coordinates`, written
independently of the product's reader (:mod:`brainseg.data.geometry`), so the reader is checked
against it rather than against itself.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from brainseg.data.geometry import plane_of

TILT_DEGREES = 12.0


def _geometry(kind: str, extent: np.ndarray, spacing: tuple) -> tuple[tuple, tuple, tuple]:
    """``(orientation, spacing (slices, rows, columns), shape)`` of one kind of stack covering a
    volume of ``extent`` (x, y, z mm) whose grid has ``spacing`` ``(dz, dy, dx)``."""
    dz, dy, dx = spacing
    if kind == "oblique":
        angle = math.radians(TILT_DEGREES)
        orientation = (1.0, 0.0, 0.0, 0.0, math.cos(angle), math.sin(angle))
        own = (1.2 * dz, dy, dx)
        along = (extent[1] * math.sin(angle) + extent[2] * math.cos(angle),
                 extent[1] * math.cos(angle) + extent[2] * math.sin(angle), extent[0])
        margin = 1.1
    elif kind == "sagittal":  # rows down the head, columns front to back, slices right to left
        orientation = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
        own = (dx, 0.75 * dy, 0.75 * dy)
        along = (extent[0], extent[2], extent[1])
        margin = 1.15
    elif kind == "thick":
        orientation = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
        own = (2.5 * dz, 0.8 * dy, 0.8 * dx)
        along = (extent[2], extent[1], extent[0])
        margin = 1.2
    else:  # coronal: rows down the head, slices front to back
        orientation = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
        own = (dy, dz, dx)
        along = (extent[1], extent[2], extent[0])
        margin = 1.1
    shape = tuple(int(math.ceil(margin * length / step)) + 1 for length, step in zip(along, own))
    return orientation, own, shape


KINDS = ("oblique", "sagittal", "thick", "coronal")


def plane_prefix(orientation: tuple) -> str:
    """How a scanner's series description starts for a stack of ``orientation``: AX, SAG, COR or OBL."""
    return {"axial": "AX", "sagittal": "SAG", "coronal": "COR", "oblique": "OBL"}[plane_of(orientation)]


def positions(shape: tuple, spacing: tuple, origin: tuple, orientation: tuple) -> np.ndarray:
    """Patient position (x, y, z mm) of every voxel ``(D, H, W, 3)``: the slice's ImagePositionPatient,
    plus the column index times the column spacing along the row cosines, plus the row index times the
    row spacing along the column cosines; slices along the cross product of the two."""
    row, column = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, column)
    k, i, j = (np.arange(n, dtype=float) for n in shape)
    return (np.asarray(origin, float) + k[:, None, None, None] * spacing[0] * normal
            + i[None, :, None, None] * spacing[1] * column + j[None, None, :, None] * spacing[2] * row)


def rotation_matrix(axis: np.ndarray, degrees: float) -> np.ndarray:
    """The rotation by ``degrees`` about the unit vector ``axis`` (Rodrigues' formula)."""
    x, y, z = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    cross = np.asarray([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    angle = math.radians(degrees)
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def frame_motion(rng: np.random.Generator, centre: np.ndarray) -> np.ndarray:
    """A re-positioning of the patient: the 4x4 matrix taking a point of the head in the first frame
    (patient mm) to where it lies in the second, a rotation of 5-10 degrees about a random axis
    through ``centre`` and a shift of 5-15 mm in a random direction."""
    rotation = rotation_matrix(rng.normal(size=3), rng.uniform(5.0, 10.0))
    direction = rng.normal(size=3)
    shift = direction / np.linalg.norm(direction) * rng.uniform(5.0, 15.0)
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = centre + shift - rotation @ centre
    return matrix


def grid_centre(shape: tuple, spacing: tuple, origin: tuple) -> np.ndarray:
    """The patient position (x, y, z mm) of the middle of an axial grid of ``shape`` ``(D, H, W)`` and
    ``spacing`` ``(dz, dy, dx)`` whose first voxel lies at ``origin``."""
    return np.asarray(origin, float) + 0.5 * (np.asarray(shape[::-1], float) - 1) * np.asarray(spacing[::-1], float)


def own_grids(images: dict, spacing: tuple, origin: tuple, moved: dict | None = None) -> dict:
    """``{name: (volume, spacing, origin, orientation)}``: the first of ``images`` (``(D, H, W)``
    volumes on the axial grid of ``spacing`` ``(dz, dy, dx)`` whose first voxel lies at ``origin``
    (x, y, z)) as it is, every other one resampled (linearly) onto a stack of its own, centred on the
    same point, in the same frame of reference, or (``moved``: ``{name: 4x4 matrix}`` from
    :func:`frame_motion`) in a frame where the head lies where the matrix takes it."""
    names = list(images)
    shape = np.asarray(images[names[0]].shape)
    dz, dy, dx = spacing
    extent = np.asarray([shape[2] * dx, shape[1] * dy, shape[0] * dz])
    centre = grid_centre(tuple(shape), spacing, origin)
    out = {names[0]: (images[names[0]], tuple(spacing), tuple(origin), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))}
    for number, name in enumerate(names[1:]):
        orientation, own, own_shape = _geometry(KINDS[min(number, len(KINDS) - 1)], extent, spacing)
        row, column = np.asarray(orientation[:3]), np.asarray(orientation[3:])
        normal = np.cross(row, column)
        half = 0.5 * np.asarray([(n - 1) * s for n, s in zip(own_shape, own)])
        own_origin = centre - half[0] * normal - half[1] * column - half[2] * row
        points = positions(own_shape, own, own_origin, orientation)
        if moved and name in moved:  # where, in the first frame, the head's point seen at each voxel lay
            inverse = np.linalg.inv(moved[name])
            points = points @ inverse[:3, :3].T + inverse[:3, 3]
        # the study's grid is axial: index = (position - origin) / spacing, axis by axis
        index = [(points[..., axis] - origin[axis]) / step for axis, step in ((2, dz), (1, dy), (0, dx))]
        volume = images[name]
        resampled = ndimage.map_coordinates(volume.astype(np.float32), index, order=1, mode="constant", cval=0.0)
        out[name] = (np.clip(np.rint(resampled), 0, np.iinfo(volume.dtype).max).astype(volume.dtype), own,
                     tuple(float(v) for v in own_origin), orientation)
    return out
