"""An RT Structure Set as a label volume on its image's voxel grid.

:meth:`ContourMask.on_grid` checks that the structure set references the case's first sequence
(its series, the images its contours name, one frame of reference) and puts every contour of the
ROIs ``--roi-labels`` maps onto a plane of that series (:meth:`ContourMask.read`: or of another
sequence of the case it references, read through that sequence's geometry); ``read_region`` rasterises the planes a
region covers. A voxel belongs to an ROI when its centre lies inside the ROI's contours on that
plane (even-odd: an inner contour is a hole, as in 3D Slicer and rt-utils) or on one of their
outlines, so a contour traced through the centres of a mask's boundary voxels (what mask-to-contour
tools such as rt-utils and OpenCV write) reads back as that mask. ROIs are painted in the mapping's
order, a later one over an earlier one: list enclosing regions first (oedema, then necrosis, then
enhancing tumour).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from brainseg.data.geometry import Aligned
from brainseg.data.quality import ALIGNMENT_FRACTION, IndexedObject, QualityError
from brainseg.data.series import OneObject, Series, Volume
from brainseg.dicom import HeaderError
from brainseg.dicom.rtstruct import STRUCTURE_SET_REASON, StructureSet, parse_structure_set
from brainseg.io import cache, s3

ON_OUTLINE = 1e-6  # voxels: a centre this close to an outline lies on it
SNAP_DECIMALS = 4  # voxel coordinates are rounded to 1e-4 voxel: contour tools round through float32 and DS text


@dataclass(frozen=True)
class ContourOptions:
    """What reading a structure set needs beyond its object: ``--roi-labels`` (parsed), the dataset's
    identity key (its references are compared as keyed hashes), and whether reasons may quote ROI
    names the user did not type (free text that may hold a name: only where the data owner looks)."""

    roi_labels: tuple = ()
    identity_key: bytes = b""
    show_names: bool = False  # reasons quote every ROI name (brainseg-inspect), else only those --roi-labels names


def is_structure_set(obj: IndexedObject) -> bool:
    """Whether the index took ``obj`` for an RT Structure Set (a non-image object of that class)."""
    return obj.stray and obj.error == STRUCTURE_SET_REASON


def read_structure_set(bucket: str, obj: IndexedObject, identity_key: bytes) -> StructureSet:
    """The RT Structure Set ``obj``, read whole (through the host's cache) and parsed, its UIDs as
    keyed hashes.

    Raises:
        QualityError: not a readable RT Structure Set (damaged, or changed since it was indexed).
    """
    try:
        [data] = cache.get_ranges([(bucket, obj.key, 0, obj.size, obj.etag)])
        return parse_structure_set(bytes(data), identity_key)
    except (HeaderError, s3.S3Error) as err:  # a damaged or changed object costs its case, not the catalog
        raise QualityError(f"mask (RTSTRUCT {obj.name}): {err}") from None


def _mm(value: float) -> str:
    """Millimetres in words that stay short for absurd values (a damaged coordinate of 1e30)."""
    return f"{value:.2f} mm" if abs(value) < 1e5 else f"{value:.3g} mm"


def _outside(polygon: np.ndarray, plane_shape: tuple) -> bool:
    """Whether a contour (``(n, 2)`` row, column voxel coordinates) lies wholly outside a plane of
    ``plane_shape``: it could mark no voxel (one partly outside is clipped to the plane)."""
    low, high = polygon.min(axis=0), polygon.max(axis=0)
    return bool((high < -0.5).any() or (low > np.asarray(plane_shape) - 0.5).any())


def _rows_of(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For integer ranges ``[low, high]`` (one per segment): ``(segment index, integer)`` of every
    integer in each."""
    counts = np.maximum(high - low + 1, 0).astype(np.int64)
    segments = np.repeat(np.arange(len(counts)), counts)
    steps = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return segments, low[segments] + steps


def _fill(polygons: list, rows: int, columns: int) -> np.ndarray:
    """Pixels whose centres lie inside (even-odd) ``polygons`` (``(n, 2)`` row, column) or on an outline."""
    starts = np.concatenate(polygons)
    ends = np.concatenate([np.roll(polygon, -1, axis=0) for polygon in polygons])
    r0, c0, r1, c1 = starts[:, 0], starts[:, 1], ends[:, 0], ends[:, 1]
    spans = np.zeros((rows, columns + 1), dtype=np.int32)
    # Inside: each edge crosses the rows y with min <= y < max (half-open: a vertex counts once); a
    # row's crossings sorted by column pair up, and the centres between a pair are inside.
    # Row ranges are clipped to the plane: a contour reaching far outside it (a damaged coordinate)
    # costs no more than one within it.
    edges, ys = _rows_of(np.clip(np.ceil(np.minimum(r0, r1)), 0, rows), np.clip(np.ceil(np.maximum(r0, r1)) - 1, -1, rows - 1))
    xs = c0[edges] + (ys - r0[edges]) * (c1[edges] - c0[edges]) / (r1[edges] - r0[edges])
    order = np.lexsort((xs, ys))
    ys, xs = ys[order], xs[order]
    first, last = np.ceil(xs[0::2]), np.floor(xs[1::2])
    keep = (ys[0::2] >= 0) & (ys[0::2] < rows) & (first <= last) & (last >= 0) & (first < columns)
    y, first, last = ys[0::2][keep].astype(int), np.clip(first[keep], 0, columns).astype(int), \
        np.clip(last[keep], -1, columns - 1).astype(int)
    np.add.at(spans, (y, first), 1)
    np.add.at(spans, (y, last + 1), -1)
    out = np.cumsum(spans, axis=1)[:, :columns] > 0
    # On an outline: the centres a segment passes through (a horizontal one: every centre along it).
    flat = np.abs(r1 - r0) < ON_OUTLINE
    edges, ys = _rows_of(np.clip(np.ceil(np.minimum(r0, r1) - ON_OUTLINE), 0, rows),
                         np.clip(np.floor(np.maximum(r0, r1) + ON_OUTLINE), -1, rows - 1))
    edges, ys = edges[~flat[edges]], ys[~flat[edges]]
    xs = c0[edges] + (ys - r0[edges]) * (c1[edges] - c0[edges]) / (r1[edges] - r0[edges])
    on = np.abs(xs - np.round(xs)) < ON_OUTLINE
    level = flat & (np.abs(r0 - np.round(r0)) < ON_OUTLINE)
    runs, xs_flat = _rows_of(np.clip(np.ceil(np.minimum(c0, c1)[level] - ON_OUTLINE), 0, columns),
                             np.clip(np.floor(np.maximum(c0, c1)[level] + ON_OUTLINE), -1, columns - 1))
    points_y = np.concatenate([ys[on], np.round(r0[level])[runs]]).astype(int)
    points_x = np.concatenate([np.round(xs[on]), xs_flat]).astype(int)
    inside = (points_y >= 0) & (points_y < rows) & (points_x >= 0) & (points_x < columns)
    out[points_y[inside], points_x[inside]] = True
    return out


# What a structure set's mapped ROIs lose when rasterised, as counted in ContourMask.left_out.
LEFT_OUT = ("point or open contours", "closed contours of one or two points", "mapped ROIs with no closed contour",
            "mapped ROIs clipped to the volume")


@dataclass(frozen=True)
class ContourMask(OneObject, Volume):
    """``planes[z]``: ``((label, (polygon, ...)), ...)`` on plane ``z`` of the reference grid, in painting
    order, each polygon ``(n, 2)`` (row, column) in voxels. Geometry attributes are the reference series'."""

    name: str  # the structure set object's file name
    shape: tuple
    spacing: tuple
    origin: tuple
    orientation: tuple
    planes: tuple
    key: str = ""  # the object's key and ETag, and the ROI mapping: what names it, resampled, in the host's cache
    etag: str = ""
    roi_labels: tuple = ()
    notes: tuple = ()  # what of the mapped ROIs was left out or marks nothing, in words (logged with the case)
    left_out: tuple = ()  # the same counted: ((what, count), ...), for a dataset's profile

    bytes_per_voxel = 1
    what = "structure set"

    @property
    def variant(self) -> str:
        return repr(self.roi_labels)

    @classmethod
    def read(cls, bucket: str, obj: IndexedObject, reference: Series, against: str, roi_labels: tuple,
             identity_key: bytes, others: dict | None = None, show_names: bool = False) -> ContourMask | Aligned:
        """The structure set ``obj`` (read whole) on ``reference``'s grid (:meth:`on_grid`); or, when
        it references one of ``others`` (``{name: volume}``: the case's other sequences as the case
        reads them) instead, on that sequence's own planes: as they are when the sequence shares the
        reference's grid, else read through its geometry (and registration) onto the reference grid
        (nearest voxel).

        Raises:
            QualityError: as :meth:`on_grid`, or an object that is not a readable RT Structure Set
                (damaged, or changed since it was indexed).
        """
        structure_set = read_structure_set(bucket, obj, identity_key)
        drawn_on = [(name, volume) for name, volume in (others or {}).items()
                    if volume.native.headers[0].series_hash in structure_set.series_frames
                    and reference.headers[0].series_hash not in structure_set.series_frames]
        name, volume = drawn_on[0] if drawn_on else (against, reference)
        drawn = replace(cls.on_grid(obj.name, structure_set, volume.native, name, roi_labels,
                                    others=list(others or ()), show_names=show_names),
                        key=obj.key, etag=obj.etag, roi_labels=tuple(roi_labels))
        if not isinstance(volume, Aligned):
            return drawn
        return Aligned(drawn, reference.shape, reference.spacing, reference.origin, reference.orientation, labels=True,
                       registration=volume.registration)

    @classmethod
    def on_grid(cls, name: str, structure_set: StructureSet, reference: Series, against: str,
                roi_labels: tuple, others: list | None = None, show_names: bool = False) -> ContourMask:
        """Place the ROIs ``roi_labels`` maps (``((name, label), ...)``; empty: every ROI as 1) on
        ``reference``'s planes. Reasons name an ROI by the name ``roi_labels`` gives it, else (unless
        ``show_names``) by its ROINumber: ROI names are free text, and may hold a patient's name.

        Raises:
            QualityError: the set references another series, images outside it or another frame of
                reference, or belongs to another patient; a mapped ROI is absent; a contour lies off the
                planes (how far).
        """
        what = f"mask (RTSTRUCT {name})"
        series = reference.headers[0].series_hash
        if structure_set.series_frames and series not in structure_set.series_frames:
            raise QualityError(f"{what} references another series than the {' or '.join([against, *(others or [])])} "
                               "series")
        patient = reference.headers[0].patient_hash
        if structure_set.patient and patient and structure_set.patient != patient:
            raise QualityError(f"{what} belongs to another patient than the {against} series (their PatientIDs "
                               "differ: a mix-up on export?)")
        instances = {header.instance_hash for header in reference.headers}
        typed = {roi.lower() for roi, _ in roi_labels}
        named = lambda roi: repr(roi.name) if show_names or roi.name.lower() in typed else f"number {roi.number}"
        by_name = {roi.name.lower(): roi for roi in structure_set.rois}
        if roi_labels:
            missing = [roi for roi, _ in roi_labels if roi.lower() not in by_name]
            if missing:
                raise QualityError(f"{what} has no ROI named {', '.join(map(repr, missing))} (it has "
                                   f"{', '.join(named(roi) for roi in structure_set.rois) or 'none'}"
                                   f"{'' if show_names else '; brainseg-inspect shows their names'}); "
                                   "fix --roi-labels")
            mapped = [(by_name[roi.lower()], label) for roi, label in roi_labels]
        else:
            mapped = [(roi, 1) for roi in structure_set.rois if roi.contours]
        frame = structure_set.series_frames.get(series, "")
        elsewhere = [named(roi) for roi, _ in mapped if frame and roi.frame_of_reference
                     and roi.frame_of_reference != frame]
        if elsewhere:
            raise QualityError(f"{what}: ROI {', '.join(elsewhere)} lies in another frame of reference "
                               f"than the {against} series")
        orientation = np.asarray(reference.orientation, dtype=float)
        row_cosine, column_cosine = orientation[:3], orientation[3:]
        normal = np.cross(row_cosine, column_cosine)
        depth = reference.shape[0]
        planes: list[list] = [[] for _ in range(depth)]
        clipped: dict[int, float] = {}  # per mapped ROI: the largest share of a contour's points outside the plane
        for roi, label in mapped:
            polygons: dict[int, list] = {}
            for contour in roi.contours:
                if contour.images and not set(contour.images) <= instances:
                    raise QualityError(f"{what}: a contour of ROI {named(roi)} names an image that is not in the "
                                       f"{against} series")
                offsets = contour.points - np.asarray(reference.origin)
                along = offsets @ normal / reference.spacing[0]
                polygon = np.round(np.stack([offsets @ column_cosine / reference.spacing[1],
                                             offsets @ row_cosine / reference.spacing[2]], axis=1), SNAP_DECIMALS)
                middle = float(along.mean())
                if not -0.5 <= middle < depth - 0.5 or _outside(polygon, reference.shape[1:]):
                    raise QualityError(f"{what}: a contour of ROI {named(roi)} lies outside the {against} volume "
                                       f"(its centre {_mm(middle * reference.spacing[0])} along the normal, "
                                       f"{_mm(float(polygon[:, 0].mean()) * reference.spacing[1])} down the columns, "
                                       f"{_mm(float(polygon[:, 1].mean()) * reference.spacing[2])} along the rows "
                                       f"from its first voxel; the {against} spans {_mm((depth - 1) * reference.spacing[0])}, "
                                       f"{_mm((reference.shape[1] - 1) * reference.spacing[1])} and "
                                       f"{_mm((reference.shape[2] - 1) * reference.spacing[2])})")
                beyond = ((polygon < -0.5) | (polygon > np.asarray(reference.shape[1:]) - 0.5)).any(axis=1).mean()
                if beyond:
                    clipped[id(roi)] = max(clipped.get(id(roi), 0.0), float(beyond))
                plane = int(round(middle))
                off = float(np.abs(along - plane).max())
                if off > ALIGNMENT_FRACTION:
                    raise QualityError(f"{what}: a contour of ROI {named(roi)} lies off the {against} planes "
                                       f"({_mm(middle * reference.spacing[0])} along the normal, "
                                       f"{_mm(off * reference.spacing[0])} from plane {plane}; the {against} has "
                                       f"{depth} planes every {reference.spacing[0]:.3g} mm)")
                polygons.setdefault(plane, []).append(polygon)
            for plane, shapes in polygons.items():
                planes[plane].append((label, tuple(shapes)))
        notes, counts = [], dict.fromkeys(LEFT_OUT, 0)
        for roi, _ in mapped:
            for what_left, count in zip(LEFT_OUT, (roi.marks, roi.degenerate, not roi.contours, id(roi) in clipped)):
                counts[what_left] += int(count)
            if roi.marks:
                notes.append(f"ROI {named(roi)}: {roi.marks} point or open contour(s) left out (they mark, not bound)")
            if roi.degenerate:
                notes.append(f"ROI {named(roi)}: {roi.degenerate} closed contour(s) of one or two points (a point or "
                             "a line: no area)")
            if not roi.contours:
                notes.append(f"ROI {named(roi)} has no closed contour: it labels nothing")
            if id(roi) in clipped:
                notes.append(f"ROI {named(roi)}: contour(s) partly outside the {against} planes, clipped to them "
                             f"(up to {100 * clipped[id(roi)]:.0f}% of a contour's points outside)")
        return cls(name, reference.shape, reference.spacing, reference.origin, reference.orientation,
                   tuple(tuple(plane) for plane in planes), notes=tuple(f"{what}: {note}" for note in notes),
                   left_out=tuple((what_left, count) for what_left, count in counts.items() if count))

    def read_region(self, z0: int, z1: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Label values ``[z0:z1, y0:y1, x0:x1]`` (0 outside every mapped ROI) as float32."""
        self._check_region((z0, z1, y0, y1, x0, x1))
        out = np.zeros((z1 - z0, y1 - y0, x1 - x0), dtype=np.float32)
        rows, columns = self.shape[1:]
        for z in range(z0, z1):
            for label, polygons in self.planes[z]:
                out[z - z0][_fill(list(polygons), rows, columns)[y0:y1, x0:x1]] = label
        return out

