"""An RT Structure Set (RTSTRUCT) read into plain values: its ROIs, their closed planar contours in
patient millimetres, and what they reference, identifiers as keyed hashes only.

An RTSTRUCT carries no pixel data, so the header index records it as a non-image object (the reason
:data:`STRUCTURE_SET_REASON`); a mask folder holding one is read whole (they are small: contour
points) and placed on the case's grid by :mod:`brainseg.data.contours`. Reasons name elements, never
their values; ROI names (structure labels such as "Necrosis") are kept, as the label mapping needs
them.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import pydicom

from brainseg.dicom.elements import describe
from brainseg.dicom.errors import HeaderError
from brainseg.dicom.header import STRUCTURE_SET_STORAGE, identity_hash, not_an_image_reason

STRUCTURE_SET_REASON = not_an_image_reason("RT Structure Set Storage")
CLOSED_PLANAR = "CLOSED_PLANAR"


@dataclass(frozen=True)
class Contour:
    """One closed planar contour: its points ``(n, 3)`` (x, y, z) in patient mm (LPS) and the keyed
    hashes of the image instances it names (``ContourImageSequence``; often empty)."""

    points: np.ndarray
    images: tuple


@dataclass(frozen=True)
class Roi:
    name: str  # free text typed at a workstation: shown only where the data owner looks (brainseg-inspect)
    frame_of_reference: str  # keyed hash
    contours: tuple
    number: int = 0  # ROINumber: how a job's logs name an ROI whose name the user did not type
    marks: int = 0  # POINT and OPEN_PLANAR contours: they mark, not bound, and are left out
    degenerate: int = 0  # closed contours of one or two points: a point or a line, no area


@dataclass(frozen=True)
class StructureSet:
    """The ROIs with contours, the series the set references with each one's frame of reference
    (``{series hash: frame hash}``), and whose they are."""

    rois: tuple
    series_frames: dict
    patient: str = ""  # keyed hash of its PatientID ("" when it has none)


def _sequence(dataset, keyword: str) -> list:
    return list(getattr(dataset, keyword, None) or [])


def _points(item, roi: int) -> np.ndarray:
    """A contour's points; reasons name the ROI by its ROINumber (its name is free text)."""
    try:
        values = np.asarray([float(v) for v in item.ContourData], dtype=float)
    except (AttributeError, TypeError, ValueError):
        raise HeaderError(f"ROI number {roi}: a contour's ContourData (3006,0050) is missing or not numbers") from None
    if values.size < 3 or values.size % 3 or not np.isfinite(values).all():  # one point: a one-voxel contour
        raise HeaderError(f"ROI number {roi}: a contour's ContourData (3006,0050) holds {values.size} value(s); "
                          "expected finite (x, y, z) triplets")
    return values.reshape(-1, 3)


def parse_structure_set(data: bytes, identity_key: bytes) -> StructureSet:
    """The structure set in ``data`` (a whole RTSTRUCT object).

    Raises:
        HeaderError: not an RT Structure Set, or an element it needs is missing or malformed.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings quote values
            dataset = pydicom.dcmread(io.BytesIO(data))
    except Exception as err:
        raise HeaderError(f"the RT Structure Set cannot be parsed ({describe(err)})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings on damaged values quote them
            return _structure_set(dataset, identity_key)
    except HeaderError:
        raise
    except Exception as err:  # pydicom decodes lazily: a damaged value raises many types where it is read
        raise HeaderError(f"the RT Structure Set is damaged ({describe(err)})") from None


def _structure_set(dataset, identity_key: bytes) -> StructureSet:
    sop_class = str(getattr(dataset, "SOPClassUID", "") or "")
    if sop_class != STRUCTURE_SET_STORAGE:
        raise HeaderError("not an RT Structure Set (SOPClassUID (0008,0016) is another class)")
    hashed = lambda uid: identity_hash(identity_key, str(uid).strip())
    series_frames = {}
    for frame in _sequence(dataset, "ReferencedFrameOfReferenceSequence"):
        frame_hash = hashed(frame.FrameOfReferenceUID) if getattr(frame, "FrameOfReferenceUID", None) else ""
        for study in _sequence(frame, "RTReferencedStudySequence"):
            for item in _sequence(study, "RTReferencedSeriesSequence"):
                if getattr(item, "SeriesInstanceUID", None):
                    series_frames[hashed(item.SeriesInstanceUID)] = frame_hash
    names = {}
    for item in _sequence(dataset, "StructureSetROISequence"):
        try:
            number = int(item.ROINumber)
        except (AttributeError, TypeError, ValueError):
            raise HeaderError("an item of StructureSetROISequence (3006,0020) has no ROINumber (3006,0022)") from None
        names[number] = (str(getattr(item, "ROIName", "") or f"ROI {number}").strip(),
                         hashed(item.ReferencedFrameOfReferenceUID) if getattr(item, "ReferencedFrameOfReferenceUID",
                                                                               None) else "")
    rois = []
    for item in _sequence(dataset, "ROIContourSequence"):
        number = int(getattr(item, "ReferencedROINumber", -1) or -1)
        if number not in names:
            raise HeaderError(f"ROIContourSequence (3006,0039) names ROI number {number}, which "
                              "StructureSetROISequence (3006,0020) does not define")
        name, frame = names[number]
        contours, marks = [], 0
        for contour in _sequence(item, "ContourSequence"):  # points and open contours mark, not bound: left out
            if str(getattr(contour, "ContourGeometricType", "") or "").strip().upper() != CLOSED_PLANAR:
                marks += 1
                continue
            images = tuple(hashed(ref.ReferencedSOPInstanceUID) for ref in _sequence(contour, "ContourImageSequence")
                           if getattr(ref, "ReferencedSOPInstanceUID", None))
            contours.append(Contour(_points(contour, number), images))
        rois.append(Roi(name, frame, tuple(contours), number, marks,
                        sum(len(contour.points) < 3 for contour in contours)))
    patient = str(getattr(dataset, "PatientID", "") or "").strip()
    return StructureSet(tuple(rois), series_frames, hashed(patient) if patient else "")
