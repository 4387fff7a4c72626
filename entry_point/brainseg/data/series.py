"""The region reader: one DICOM series in S3 as a ``(D, H, W)`` volume read by byte ranges.

For native pixel data a region costs, per slice, one ranged GET of the rows it covers (full
width, since rows are contiguous). Ranges that fall in the same object (frames of a multi-frame
object) are coalesced when the gap between them is small, so a patch costs a few requests, not
one per frame. Compressed frames are fetched whole (located by the offset table) and decoded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from brainseg.dicom import ObjectHeader, PixelDataError, decode_frame, decode_native_rows, item_fragments
from brainseg.dicom.pixels import split_frames
from brainseg.io import cache

COALESCE_GAP_BYTES = 256 * 1024  # 256 KiB: re-reading this costs less than another request's latency
MAX_RANGE_BYTES = 8 * 1024 * 1024  # 8 MiB: keeps each GET retryable and several in flight


def coalesce(ranges: list[tuple[int, int]], gap_bytes: int = COALESCE_GAP_BYTES,
             max_bytes: int = MAX_RANGE_BYTES) -> list[tuple[int, int, list[int]]]:
    """Merge byte ranges of one object into fewer requests.

    Args:
        ranges: ``(start, stop)`` pairs, stop exclusive, in any order.
        gap_bytes: merge two ranges when at most this many unwanted bytes lie between them.
        max_bytes: never grow a merged request past this size (a single larger range stays whole).

    Returns:
        ``(start, stop, members)`` per request, ``members`` being indices into ``ranges``.
    """
    merged: list[tuple[int, int, list[int]]] = []
    for index in sorted(range(len(ranges)), key=lambda i: ranges[i]):
        start, stop = ranges[index]
        if merged:
            current_start, current_stop, members = merged[-1]
            if start - current_stop <= gap_bytes and max(stop, current_stop) - current_start <= max_bytes:
                merged[-1] = (current_start, max(stop, current_stop), members + [index])
                continue
        merged.append((start, stop, [index]))
    return merged


class Volume:
    """What every volume a case holds (a series, a SEG or a structure set on the series' grid)
    shares: region bounds checked against ``shape``, and the whole volume as one region."""

    what = "volume"

    @property
    def native(self):
        """The series whose own slices this volume's intensity statistics come from: itself."""
        return self

    def _check_region(self, bounds: tuple[int, ...]) -> None:
        for axis, (low, high, size) in enumerate(zip(bounds[0::2], bounds[1::2], self.shape)):
            if not (isinstance(low, (int, np.integer)) and isinstance(high, (int, np.integer))
                    and 0 <= low < high <= size):
                raise ValueError(f"region {bounds} is outside the {self.what} of shape {self.shape}: "
                                 f"axis {axis} needs 0 <= start < stop <= {size}")

    def read_volume(self) -> np.ndarray:
        """The whole volume as a ``(D, H, W)`` float32 array."""
        return self.read_region(*self.whole)

    @property
    def whole(self) -> tuple:
        """The region ``(0, D, 0, H, 0, W)`` of the whole volume."""
        return tuple(v for size in self.shape for v in (0, size))

    def requests(self, region: tuple) -> list[tuple]:
        """The ``(bucket, key, start, stop, etag)`` ranges :meth:`read_region` asks the host's cache for
        ``region``, without reading them: none here (a volume held in memory, a structure set
        rasterised from contours read when the catalog was built)."""
        return []


def object_identity(volume) -> list[str]:
    """What names the objects ``volume`` is read from, as text: its bucket, keys and ETags (none for
    an array in memory); part of the names its resampled tiles and registrations are kept under."""
    return [str(getattr(volume, "bucket", "")), *map(str, getattr(volume, "keys", ())),
            *map(str, getattr(volume, "etags", ()))]


class OneObject:
    """A volume read from one object, ``key`` at ``etag`` (a SEG, a structure set): the names
    :class:`~brainseg.data.geometry.Aligned` keeps it under in the host's cache, as a series' are."""

    @property
    def keys(self) -> tuple:
        return (self.key,)

    @property
    def etags(self) -> tuple:
        return (self.etag,)


@dataclass(frozen=True)
class Series(Volume):
    """A sorted DICOM series: ``planes[z] = (object index, frame index)``.

    Attributes:
        bucket: the S3 bucket holding the objects.
        keys: object keys; ``sizes``, ``etags`` and ``headers`` are parallel to them. Every read
            sends the indexed ETag (If-Match), so a changed object fails loudly. A catalog holds
            them, and ``planes``, as columns (:mod:`brainseg.data.columns`) that read as tuples.
        planes: for each slice along the normal (ascending), which object and frame holds it.
        spacing: ``(dz, dy, dx)`` in mm.
        origin: patient position (mm) of the first voxel of plane 0.
        orientation: row and column direction cosines (six floats).
        fetch: reads ``[(bucket, key, start, stop, etag), ...]`` ranges, in order; default
            :func:`brainseg.io.cache.get_ranges` (files held in memory have their own).
    """

    bucket: str
    keys: tuple
    sizes: tuple
    etags: tuple
    headers: tuple
    planes: tuple
    spacing: tuple
    origin: tuple
    orientation: tuple
    fetch: Callable[[list], list] | None = field(default=None, compare=False, repr=False)
    what = "series"

    def _get(self, requests: list) -> list[bytes]:
        return (self.fetch or cache.get_ranges)(requests)

    @property
    def shape(self) -> tuple[int, int, int]:
        header = self.headers[0]
        return (len(self.planes), header.rows, header.columns)

    @property
    def bytes_per_voxel(self) -> int:
        return self.headers[0].bytes_per_pixel

    def read_region(self, z0: int, z1: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The voxels ``[z0:z1, y0:y1, x0:x1]`` as float32 in modality units.

        Native objects: one ranged GET of rows ``y0..y1`` per slice (coalesced within an object).
        Compressed objects: each needed frame is fetched whole and decoded.
        """
        self._check_region((z0, z1, y0, y1, x0, x1))
        return self._read(list(range(z0, z1)), y0, y1, x0, x1)

    def read_planes(self, indices: list[int]) -> np.ndarray:
        """Whole slices at the given z indices, stacked as ``(len(indices), H, W)``."""
        depth, rows, columns = self.shape
        for z in indices:
            self._check_region((int(z), int(z) + 1, 0, rows, 0, columns))
        return self._read([int(z) for z in indices], 0, rows, 0, columns)

    def requests(self, region: tuple) -> list[tuple]:
        self._check_region(tuple(region))
        z0, z1, y0, y1, x0, x1 = region
        return self._plan(list(range(z0, z1)), y0, y1)[0]

    def _read(self, zs: list[int], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        out = np.empty((len(zs), y1 - y0, x1 - x0), dtype=np.float32)
        requests, fills, headers = self._plan(zs, y0, y1)
        for body, (obj, request_start, pieces) in zip(self._get(requests), fills):
            try:
                self._fill(out, memoryview(body), headers[obj], request_start, pieces, y0, y1, x0, x1)
            except PixelDataError as err:
                raise PixelDataError(f"{self.keys[obj].rsplit('/', 1)[-1]}: {err}") from None
        return out

    def _plan(self, zs: list[int], y0: int, y1: int) -> tuple[list, list, dict]:
        """The ranges that slices ``zs``, rows ``y0..y1``, are read by (coalesced within an object),
        with what each fills (object, its first byte or ``None`` for a whole object, pieces) and
        the headers of the objects read."""
        wanted: dict[int, list[tuple[int, int, int]]] = {}  # object -> (start, stop, out index)
        whole_objects: dict[int, list[tuple[int, int]]] = {}  # compressed, no offset table
        headers: dict[int, ObjectHeader] = {}  # each object's, read once (a column builds it on each read)
        for index, z in enumerate(zs):
            obj, frame = self.planes[z]
            header = headers[obj] if obj in headers else headers.setdefault(obj, self.headers[obj])
            if not header.encapsulated:
                row_bytes = header.columns * header.bytes_per_pixel
                start = header.pixel_offset + frame * header.frame_bytes + y0 * row_bytes
                wanted.setdefault(obj, []).append((start, start + (y1 - y0) * row_bytes, index))
            elif header.frame_starts:
                starts = header.frame_starts
                stop = starts[frame + 1] if frame + 1 < len(starts) else self.sizes[obj]
                wanted.setdefault(obj, []).append((starts[frame], stop, index))
            else:
                whole_objects.setdefault(obj, []).append((index, frame))

        requests, fills = [], []
        for obj, pieces in wanted.items():
            for start, stop, members in coalesce([(p[0], p[1]) for p in pieces]):
                requests.append((self.bucket, self.keys[obj], start, stop, self.etags[obj]))
                fills.append((obj, start, [pieces[m] for m in members]))
        for obj, pieces in whole_objects.items():
            requests.append((self.bucket, self.keys[obj], headers[obj].pixel_offset, self.sizes[obj], self.etags[obj]))
            fills.append((obj, None, pieces))
        return requests, fills, headers

    def _fill(self, out: np.ndarray, view: memoryview, header: ObjectHeader, request_start: int | None, pieces: list,
              y0: int, y1: int, x0: int, x1: int) -> None:
        """Decode the fetched bytes of one request (of an object with ``header``) into the output
        slices they cover."""
        if request_start is None:
            frames = split_frames(view, header.frames)
            for index, frame in pieces:
                if frame >= len(frames):
                    raise PixelDataError(f"holds {len(frames)} frame(s); frame {frame} is missing")
                out[index] = decode_frame([frames[frame]], header)[y0:y1, x0:x1]
            return
        for start, stop, index in pieces:
            chunk = view[start - request_start:stop - request_start]
            if header.encapsulated:
                out[index] = decode_frame(item_fragments(chunk), header)[y0:y1, x0:x1]
            else:
                out[index] = decode_native_rows(chunk, header, y1 - y0)[:, x0:x1]

    def read_headers(self) -> list[bytes]:
        """Each object's bytes before its pixel data (one ranged GET per object, concurrently): what
        a DICOM SEG needs to reference the series."""
        return self._get([(self.bucket, key, 0, header.pixel_offset, etag)
                              for key, header, etag in zip(self.keys, self.headers, self.etags)])
