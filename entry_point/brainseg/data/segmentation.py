"""A DICOM SEG object as a label volume on its image's voxel grid, read by byte ranges.

A SEG holds one frame per (segment, plane), empty frames often left out, each placed by its own
position. :meth:`SegmentationMask.on_grid` maps every frame onto a plane of the reference series
(the case's first sequence) and refuses frames that do not lie on one; :func:`place_segmentation`
also takes a SEG drawn on another sequence of the case (an oblique FLAIR, say), read through that
sequence's geometry. ``read_region`` then fetches
the rows of the frames a region covers (1-bit frames are packed without padding, so a row range is
a bit range; ranges are coalesced as a series' are), never the whole object, and paints each segment's number as the label value: ``--labels`` names
classes by segment number. Where segments overlap the higher number wins; a fractional frame
counts where it reaches half its maximum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from brainseg.data.geometry import Aligned
from brainseg.data.quality import ALIGNMENT_FRACTION, ORIENTATION_TOLERANCE, IndexedObject, QualityError
from brainseg.data.series import OneObject, Series, Volume, coalesce
from brainseg.dicom import ObjectHeader
from brainseg.io import cache

SPACING_TOLERANCE = 1e-3  # relative, SEG pixel spacing vs the image's


@dataclass(frozen=True)
class SegmentationMask(OneObject, Volume):
    """``planes[z]``: the ``(frame, segment number)`` pairs on plane ``z`` of the reference grid,
    by segment number. Geometry attributes are the reference series'."""

    bucket: str
    key: str
    size: int
    etag: str
    header: ObjectHeader
    shape: tuple
    spacing: tuple
    origin: tuple
    orientation: tuple
    planes: tuple

    bytes_per_voxel = 1
    what = "segmentation"

    @classmethod
    def on_grid(cls, bucket: str, obj: IndexedObject, reference: Series, against: str) -> SegmentationMask:
        """Place the SEG object ``obj`` on ``reference``'s grid.

        Raises:
            QualityError: another frame size, orientation or pixel spacing, or a frame that does not
                lie on a plane of the reference (naming how far off it is).
        """
        header = obj.header
        differs = f"mask (DICOM SEG {obj.name}) does not lie on the {against} grid"
        depth, rows, columns = reference.shape
        if (header.rows, header.columns) != (rows, columns):
            raise QualityError(f"{differs}: frames of {header.rows}x{header.columns}, {against} slices of "
                               f"{rows}x{columns}")
        if np.abs(np.subtract(header.orientation, reference.orientation)).max() > ORIENTATION_TOLERANCE:
            raise QualityError(f"{differs}: another orientation")
        if not np.allclose(header.pixel_spacing, reference.spacing[1:], rtol=SPACING_TOLERANCE, atol=0):
            raise QualityError(f"{differs}: pixel spacing {tuple(header.pixel_spacing)} mm, {against} "
                               f"{tuple(reference.spacing[1:])} mm")
        orientation = np.asarray(reference.orientation)
        normal = np.cross(orientation[:3], orientation[3:])
        offsets = np.asarray(header.positions, dtype=float) - np.asarray(reference.origin)
        along = offsets @ normal / reference.spacing[0]
        planes = np.round(along).astype(int)
        in_plane = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
        tolerance = ALIGNMENT_FRACTION
        bad = np.flatnonzero((np.abs(along - planes) > tolerance) | (planes < 0) | (planes >= depth)
                             | (in_plane > tolerance * min(reference.spacing[1:])))
        if bad.size:
            frame = int(bad[0])
            raise QualityError(f"{differs}: {bad.size} frame(s) off its planes, first frame {frame + 1} at "
                               f"{along[frame] * reference.spacing[0]:.2f} mm along the normal, "
                               f"{in_plane[frame]:.2f} mm aside (the {against} has {depth} planes every "
                               f"{reference.spacing[0]:.3g} mm)")
        by_plane: list[list[tuple[int, int]]] = [[] for _ in range(depth)]
        for frame, (z, segment) in enumerate(zip(planes, header.segments)):
            by_plane[int(z)].append((frame, int(segment)))
        return cls(bucket, obj.key, obj.size, obj.etag, header, reference.shape, reference.spacing, reference.origin,
                   reference.orientation, tuple(tuple(sorted(pairs, key=lambda p: p[1])) for pairs in by_plane))

    def read_region(self, z0: int, z1: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Label values ``[z0:z1, y0:y1, x0:x1]`` (segment numbers, 0 elsewhere) as float32."""
        self._check_region((z0, z1, y0, y1, x0, x1))
        out = np.zeros((z1 - z0, y1 - y0, x1 - x0), dtype=np.float32)
        header = self.header
        packed = header.bits_allocated == 1
        pieces, merged = self._plan(z0, z1, y0, y1)
        requests = [(self.bucket, self.key, start, stop, self.etag) for start, stop, _ in merged]
        count = (y1 - y0) * header.columns
        painted = []
        for body, (start, _, members) in zip(cache.get_ranges(requests), merged):
            view = np.frombuffer(body, dtype=np.uint8)
            for member in members:
                piece_start, piece_stop, z, segment, bit = pieces[member]
                chunk = view[piece_start - start:piece_stop - start]
                if packed:
                    values = np.unpackbits(chunk, bitorder="little")[bit:bit + count] > 0
                else:
                    values = chunk[:count].astype(np.uint16) * 2 >= header.fractional_max
                painted.append((segment, z, values.reshape(y1 - y0, header.columns)[:, x0:x1]))
        for segment, z, values in sorted(painted, key=lambda item: item[0]):
            out[z][values] = segment
        return out

    def requests(self, region: tuple) -> list[tuple]:
        self._check_region(tuple(region))
        z0, z1, y0, y1 = region[:4]
        return [(self.bucket, self.key, start, stop, self.etag) for start, stop, _ in self._plan(z0, z1, y0, y1)[1]]

    def _plan(self, z0: int, z1: int, y0: int, y1: int) -> tuple[list, list]:
        """The byte pieces of rows ``y0..y1`` of each frame on planes ``z0..z1`` (start, stop, z index,
        segment, first bit), and their coalesced ranges ``(start, stop, members)``."""
        header = self.header
        frame_pixels = header.rows * header.columns
        pieces = []
        for z in range(z0, z1):
            for frame, segment in self.planes[z]:
                first = frame * frame_pixels + y0 * header.columns
                last = frame * frame_pixels + y1 * header.columns
                if header.bits_allocated == 1:
                    pieces.append((header.pixel_offset + first // 8, header.pixel_offset + -(-last // 8), z - z0,
                                   segment, first % 8))
                else:
                    pieces.append((header.pixel_offset + first, header.pixel_offset + last, z - z0, segment, 0))
        return pieces, coalesce([(start, stop) for start, stop, *_ in pieces])


def place_segmentation(bucket: str, obj: IndexedObject, reference: Series, against: str,
                       others: dict) -> SegmentationMask | Aligned:
    """The SEG ``obj`` on ``reference``'s grid: its frames placed on the reference's planes when
    they lie on them; else, when they lie on the planes of one of ``others`` on a grid of its own
    (``{name: volume}``: the case's other sequences as the case reads them) and the SEG names that
    sequence's frame of reference, read through that sequence's geometry (nearest voxel; and its
    registration, when it lies in another frame than the reference), as a label series drawn there is.

    Raises:
        QualityError: the reference's reason, when the frames lie on none of them.
    """
    try:
        return SegmentationMask.on_grid(bucket, obj, reference, against)
    except QualityError as err:
        failure = err
    own_grids = {name: volume for name, volume in others.items() if isinstance(volume, Aligned)}
    if not own_grids or not obj.header.frame_hash:
        raise failure
    for name, volume in own_grids.items():
        if {header.frame_hash for header in volume.native.headers} != {obj.header.frame_hash}:
            continue
        try:
            drawn = SegmentationMask.on_grid(bucket, obj, volume.native, name)
        except QualityError:
            continue
        return Aligned(drawn, reference.shape, reference.spacing, reference.origin, reference.orientation, labels=True,
                       registration=volume.registration)
    raise QualityError(f"{failure}, nor on the {', '.join(own_grids)} grid{'s' if len(own_grids) > 1 else ''}")
