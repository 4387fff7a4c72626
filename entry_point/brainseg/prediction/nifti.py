"""A label map as NIfTI-1 (``.nii.gz``) on the DICOM series it was predicted on, for research tools
that read NIfTI (ITK-SNAP, 3D Slicer, nnU-Net, the BraTS evaluation).

The array is ``(x, y, z)`` = (column, row, slice) of the source series, the affine maps it to the
scanner's RAS+ millimetres (NIfTI's convention; DICOM is LPS+): column ``i`` steps along the row
direction cosine by the column spacing, row ``j`` along the column direction cosine by the row
spacing, slice ``k`` along the slice normal by the slice spacing, from the first voxel's
ImagePositionPatient. qform and sform both hold it (code 1, scanner). Nothing from the headers
but the geometry is written: no name, ID or UID.
"""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SCANNER = 1  # NIfTI xform code: scanner-based anatomical coordinates


def affine(spacing: tuple, origin: tuple, orientation: tuple) -> np.ndarray:
    """The RAS+ affine of a series' ``(x, y, z)`` voxels: ``spacing`` ``(dz, dy, dx)`` mm, ``origin``
    the LPS position of voxel (0, 0, 0), ``orientation`` the row and column direction cosines."""
    row, column = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, column)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row * spacing[2], column * spacing[1], normal * spacing[0]
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def label_map_bytes(labels: np.ndarray, spacing: tuple, origin: tuple, orientation: tuple) -> bytes:
    """``labels`` ``(D, H, W)`` (uint8) as the bytes of a gzipped NIfTI-1 file."""
    image = nib.Nifti1Image(np.ascontiguousarray(labels.transpose(2, 1, 0)).astype(np.uint8),
                            affine(spacing, origin, orientation))
    image.set_qform(image.affine, code=SCANNER)
    image.set_sform(image.affine, code=SCANNER)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = b"brainseg label map"
    return gzip.compress(image.to_bytes(), mtime=0)
