"""NIfTI geometry for ingest: a NIfTI affine as DICOM's slice geometry, voxels as DICOM slices, and
resampling one volume onto another's grid by patient position."""

from __future__ import annotations

import numpy as np


class IngestError(ValueError):
    """A source case or layout that cannot be converted; the message names the file."""


def geometry_from_affine(affine: np.ndarray, shape: tuple) -> tuple[tuple, tuple, tuple, bool]:
    """DICOM geometry of a NIfTI volume read as slices along its third axis.

    Returns ``(spacing (dz, dy, dx), origin, orientation, reversed)``: ``reversed`` when the third
    axis runs against the slice normal, so the slices must be written last first.

    Raises:
        IngestError: a sheared affine (the third axis not along the normal of the first two).
    """
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(affine, dtype=float)[:3]
    axes = lps[:, :3]
    lengths = np.linalg.norm(axes, axis=0)
    if min(lengths) <= 0:
        raise IngestError(f"the affine has a zero-length axis: {affine.tolist()}")
    row, column, through = (axes[:, i] / lengths[i] for i in range(3))
    normal = np.cross(row, column)
    if abs(abs(float(normal @ through)) - 1.0) > 1e-3:
        raise IngestError("the affine is sheared (slices not stacked along their normal); resample the volume first")
    flipped = float(normal @ through) < 0
    origin = lps[:, 3] + (axes[:, 2] * (shape[2] - 1) if flipped else 0.0)
    return ((float(lengths[2]), float(lengths[1]), float(lengths[0])), tuple(float(v) for v in origin),
            tuple(float(v) for v in (*row, *column)), flipped)


def slices(data: np.ndarray, flipped: bool) -> np.ndarray:
    """``(I, J, K)`` NIfTI voxels as ``(K, J, I)`` DICOM slices (rows along J, columns along I)."""
    volume = np.transpose(data, (2, 1, 0))
    return volume[::-1] if flipped else volume


def _normaliser(shape: tuple) -> np.ndarray:
    """4x4 map from voxel indices ``(i, j, k)`` to torch's normalised ``(x, y, z)`` = ``(k, j, i)``
    in [-1, 1] (``align_corners=True``)."""
    matrix = np.zeros((4, 4))
    for row, axis in enumerate((2, 1, 0)):
        matrix[row, axis] = 2.0 / max(shape[axis] - 1, 1)
        matrix[row, 3] = -1.0 if shape[axis] > 1 else 0.0
    matrix[3, 3] = 1.0
    return matrix


def resample_onto(data: np.ndarray, affine: np.ndarray, reference_affine: np.ndarray, reference_shape: tuple,
                  labels: bool = False) -> np.ndarray:
    """``data`` (voxels on ``affine``) sampled at every voxel of the reference grid by patient position:
    trilinear for images, nearest for labels, zero outside the source volume."""
    import torch
    import torch.nn.functional as F

    to_source = np.linalg.inv(affine) @ reference_affine  # reference voxel -> source voxel
    theta = _normaliser(data.shape) @ to_source @ np.linalg.inv(_normaliser(reference_shape))
    grid = F.affine_grid(torch.from_numpy(theta[:3]).float()[None], [1, 1, *reference_shape], align_corners=True)
    volume = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None, None]
    out = F.grid_sample(volume, grid, mode="nearest" if labels else "bilinear", padding_mode="zeros",
                        align_corners=True)[0, 0].numpy()
    return np.round(out).astype(data.dtype) if np.issubdtype(data.dtype, np.integer) else out.astype(data.dtype)
