"""Quality checks that turn a folder of indexed DICOM objects into a sorted series, or a reason.

Each check raises :class:`QualityError` with a sentence a person can act on. The catalog marks
the case ``excluded`` with that sentence; nothing is dropped silently. Messages name objects by
their file name within the case folder and never include patient identifiers or UIDs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from brainseg.data.columns import Headers, Numbers, Texts, plane_rows
from brainseg.data.geometry import Aligned
from brainseg.data.registration import MIN_HEAD_DICE, Registrar, Registration
from brainseg.data.series import Series
from brainseg.data.summary import CaseSummary
from brainseg.dicom import ObjectHeader
from brainseg.labels import MAX_LABEL, LabelScheme

ORIENTATION_TOLERANCE = 1e-4  # direction cosines
DUPLICATE_FRACTION = 0.01  # slices closer than 1% of the spacing are the same position
SPACING_TOLERANCE = 0.02  # 2% deviation from the median slice spacing is "uneven"
MISSING_FACTOR = 1.5  # a gap of 1.5 spacings or more means a slice is missing
ALIGNMENT_FRACTION = 0.1  # in-plane drift of the stack, as a fraction of the pixel spacing
GEOMETRY_TOLERANCE = 1e-3  # relative, image vs mask spacing


class QualityError(ValueError):
    """A series or case fails a check; the message is the exclusion reason."""


@dataclass(frozen=True, slots=True)
class IndexedObject:
    """One object of a series folder: its key, size, ETag, and header or the reason it has none.
    A ``stray`` object is not an image at all (notes.txt, a DICOMDIR, a report): it is skipped,
    while an image object without a header makes its series unusable."""

    key: str
    size: int
    etag: str
    header: ObjectHeader | None
    error: str = ""
    stray: bool = False

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]


def _names(objects: list[IndexedObject], limit: int = 3) -> str:
    names = [obj.name for obj in objects[:limit]]
    more = f" and {len(objects) - limit} more" if len(objects) > limit else ""
    return ", ".join(names) + more


def _format_mm(values) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


def assemble_series(bucket: str, folder: str, objects: list[IndexedObject]) -> Series:
    """Check the objects of one series folder and sort their planes along the slice normal.

    Args:
        bucket: the bucket holding the objects.
        folder: ``"image"`` or ``"mask"``, for messages.
        objects: every object listed under the folder; stray (non-image) objects are skipped.

    Raises:
        QualityError: no image object, unreadable image objects, mixed series, sizes or
            orientations, duplicated or missing slices, uneven spacing, misaligned stack. When
            the folder also held skipped objects, the reason names them: a damaged slice taken
            for a non-image object would explain a gap.
    """
    strays = [obj for obj in objects if obj.stray]
    try:
        return _assemble(bucket, folder, [obj for obj in objects if not obj.stray], strays)
    except QualityError as err:
        if strays and objects != strays:
            raise QualityError(f"{err} (the folder also holds {len(strays)} skipped non-image object(s): "
                               f"{_names(strays)})") from None
        raise


def _assemble(bucket: str, folder: str, objects: list[IndexedObject], strays: list[IndexedObject]) -> Series:
    if not objects:
        skipped = f" ({len(strays)} non-image object(s) skipped: {_names(strays)})" if strays else ""
        raise QualityError(f"no {folder} objects: expected a DICOM series under {folder}/{skipped}")
    broken = [obj for obj in objects if obj.header is None]
    if broken:
        raise QualityError(f"{len(broken)} {folder} object(s) unusable: {_names(broken)} "
                           f"({broken[0].error})")
    headers = [obj.header for obj in objects]
    if len({h.series_hash for h in headers}) > 1:
        raise QualityError(f"{folder}/ mixes {len({h.series_hash for h in headers})} series "
                           "(different SeriesInstanceUID); keep one series per folder")
    sizes = {(h.rows, h.columns) for h in headers}
    if len(sizes) > 1:
        raise QualityError(f"{folder} slices have different sizes {sorted(sizes)}")
    orientation = np.asarray(headers[0].orientation)
    for obj in objects:
        if np.abs(np.asarray(obj.header.orientation) - orientation).max() > ORIENTATION_TOLERANCE:
            raise QualityError(f"mixed orientations in {folder}/: {obj.name} has "
                               f"{_format_mm(obj.header.orientation)}, others {_format_mm(orientation)}")
    spacings = {tuple(round(v, 4) for v in h.pixel_spacing) for h in headers}
    if len(spacings) > 1:
        raise QualityError(f"{folder} slices have different pixel spacings {sorted(spacings)} mm")

    normal = np.cross(orientation[:3], orientation[3:])
    planes = [(i, f) for i, h in enumerate(headers) for f in range(h.frames)]
    positions = np.asarray([headers[i].positions[f] for i, f in planes], dtype=float)
    distance = positions @ normal
    order = np.argsort(distance, kind="stable")
    distance = distance[order]
    positions = positions[order]
    planes = [planes[i] for i in order]
    if len(planes) < 2:
        raise QualityError(f"{folder}/ holds a single slice; a 3D series needs at least 2")

    gaps = np.diff(distance)
    nominal = float(np.median(gaps))
    if nominal <= 0:
        nominal = max(h.slice_thickness for h in headers) or 1.0
    duplicates = np.flatnonzero(gaps < DUPLICATE_FRACTION * nominal)
    if duplicates.size:
        z = int(duplicates[0])
        names = {objects[planes[z][0]].name, objects[planes[z + 1][0]].name}
        raise QualityError(f"duplicated slice position: {duplicates.size} slice(s) repeat a "
                           f"position, first at {distance[z]:.2f} mm along the normal "
                           f"({', '.join(sorted(names))})")
    missing = np.flatnonzero(gaps > MISSING_FACTOR * nominal)
    if missing.size:
        z = int(missing[0])
        lost = int(round(gaps[z] / nominal)) - 1
        raise QualityError(f"missing slice(s): a gap of {gaps[z]:.2f} mm after slice {z} where the "
                           f"spacing is {nominal:.2f} mm (about {lost} slice(s) absent)")
    deviation = np.abs(gaps - nominal) / nominal
    if deviation.max() > SPACING_TOLERANCE:
        raise QualityError(f"uneven slice spacing: from {gaps.min():.3f} to {gaps.max():.3f} mm "
                           f"(median {nominal:.3f} mm)")
    drift = positions - positions[0] - np.outer(distance - distance[0], normal)
    if np.linalg.norm(drift, axis=1).max() > ALIGNMENT_FRACTION * min(headers[0].pixel_spacing):
        raise QualityError(f"{folder} slices are not stacked along the slice normal (gantry tilt or "
                           "a mixed stack); resample the series before training")
    return Series(
        bucket=bucket,
        keys=Texts(obj.key for obj in objects),
        sizes=Numbers(obj.size for obj in objects),
        etags=Texts(obj.etag for obj in objects),
        headers=Headers.of(headers),
        planes=plane_rows(planes),
        spacing=(nominal, *headers[0].pixel_spacing),
        origin=tuple(float(v) for v in positions[0]),
        orientation=tuple(float(v) for v in orientation),
    )


def check_grid(reference: Series, other: Series, what: str = "mask", against: str = "image") -> None:
    """``other`` (a mask or another sequence) must cover ``reference`` voxel for voxel.

    Raises:
        QualityError: shape, spacing, orientation or origin differ, naming ``what`` and ``against``.
    """
    differs = f"{what} geometry does not match {against}"
    if reference.shape != other.shape:
        raise QualityError(f"{differs}: {what} shape {other.shape}, {against} shape {reference.shape} (D, H, W)")
    if not np.allclose(reference.spacing, other.spacing, rtol=GEOMETRY_TOLERANCE, atol=0):
        raise QualityError(f"{differs}: {what} spacing {_format_mm(other.spacing)} mm, {against} "
                           f"{_format_mm(reference.spacing)} mm")
    if np.abs(np.subtract(reference.orientation, other.orientation)).max() > ORIENTATION_TOLERANCE:
        raise QualityError(f"{differs}: different orientation {_format_mm(other.orientation)} vs "
                           f"{_format_mm(reference.orientation)}")
    offset = float(np.linalg.norm(np.subtract(reference.origin, other.origin)))
    if offset > ALIGNMENT_FRACTION * min(reference.spacing):
        raise QualityError(f"{differs}: {what} origin is {offset:.2f} mm from the {against} origin")


def place(reference: Series, other: Series, what: str, against: str, labels: bool = False,
          registrar: Registrar | None = None) -> Series | Aligned:
    """``other`` (another sequence, or a label series with ``labels``) on ``reference``'s grid: itself
    when it covers it voxel for voxel, else read through its own geometry (:class:`Aligned`) when
    the two share a frame of reference and ``other`` sees part of ``reference``; a sequence in
    another frame of reference, through the rigid transform ``registrar`` fits
    (:mod:`brainseg.data.registration`) when it passes its check.

    Raises:
        QualityError: the grids differ and no shared FrameOfReferenceUID says where ``other`` lies,
            the frames differ and ``other`` cannot be registered (a label series, registration off,
            its pixels unreadable, the fit failing its check), or it lies wholly outside ``reference``.
    """
    try:
        check_grid(reference, other, what, against)
        return other
    except QualityError as err:
        differs = str(err)
    frames = [{header.frame_hash for header in series.headers} for series in (reference, other)]
    unknown = [name for name, found in zip((against, what), frames) if found == {""} or len(found) != 1]
    if unknown:
        raise QualityError(f"{differs}, and {' and '.join(unknown)} name{'s' if len(unknown) == 1 else ''} no single "
                           "FrameOfReferenceUID, so where one lies in the other is unknown")
    registration = None
    if frames[0] != frames[1]:
        registration = register_onto(reference, other, what, against, labels, registrar, differs)
    aligned = Aligned(other, reference.shape, reference.spacing, reference.origin, reference.orientation, labels,
                      registration)
    if aligned.coverage() == 0:
        raise QualityError(f"{what} lies wholly outside {against}: they share a frame of reference but {what}'s "
                           f"field of view does not reach {against}'s")
    return aligned


def register_onto(reference: Series, other: Series, what: str, against: str, labels: bool,
                  registrar: Registrar | None, differs: str) -> Registration:
    """The checked registration of ``other`` (a sequence in another frame of reference) onto ``reference``.

    Raises:
        QualityError: ``other`` is a label series (registered only through the sequence it is drawn
            on), registration is off, the pixels cannot be read, or the fit fails its check.
    """
    another = f"{differs}, and they lie in different frames of reference (another session, or the patient re-positioned)"
    if labels:
        raise QualityError(f"{another}; a label series is not registered: draw it on one of the sequences")
    if registrar is None or not registrar.enabled:
        raise QualityError(f"{another}; registration is off (--registration none)")
    try:
        registration = registrar(reference, other)
    except (ValueError, OSError, RuntimeError) as err:  # pixels unreadable (S3Error), or ITK's refusal
        raise QualityError(f"{what} lies in another frame of reference than {against} and could not be "
                           f"registered: {err}") from None
    if not registration.passed:
        raise QualityError(f"{what} lies in another frame of reference than {against}, and registering it failed "
                           f"its check: the heads overlap {registration.head_dice:.2f} after it (expected at least "
                           f"{MIN_HEAD_DICE}; {registration.head_dice_before:.2f} by the headers alone)")
    return registration


def label_problem(summary: CaseSummary, labels: LabelScheme) -> str:
    """Why a mask's label values do not fit the classes ("" when they do)."""
    values = [value for value, _ in summary.label_counts]
    if max(values) > MAX_LABEL:
        return f"mask holds label value {max(values)}; label values must lie in 0..{MAX_LABEL}"
    unknown = labels.unknown_values(values)
    if unknown:
        classes = ", ".join(f"{c.name}={'+'.join(map(str, sorted(c.values)))}" for c in labels.classes)
        return (f"mask holds label value(s) {', '.join(map(str, unknown))} that no class of --labels covers "
                f"({classes}); add them to a class or relabel the mask")
    return ""


def cross_case_duplicates(images: dict[str, list[Series]], reasons: dict[str, str]) -> dict[str, str]:
    """Cases whose image objects repeat an earlier case's (same content or same SOP instance), by case
    ID order; ``{case_id: reason}`` for those not already excluded."""
    seen: dict[str, str] = {}
    duplicates = {}
    for case_id in sorted(images):
        marks = {f"etag:{etag}" for image in images[case_id] for etag in image.etags}
        marks |= {f"sop:{header.instance_hash}" for image in images[case_id] for header in image.headers
                  if header.instance_hash}
        first = sorted({seen[mark] for mark in marks if mark in seen})
        if first and case_id not in reasons:
            duplicates[case_id] = (f"image objects duplicate those of case {first[0]} (copied or "
                                   "mislabelled patient folder)")
        for mark in marks:
            seen.setdefault(mark, case_id)
    return duplicates
