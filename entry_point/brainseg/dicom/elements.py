"""Checked reads of header elements: values, sequence items, integers, finite numbers, the frame
geometry, the rescale and a segmentation's frames. Each failure is a :class:`HeaderError` that
names the element and what was expected, never the value read (it may identify a patient).
"""

from __future__ import annotations

import datetime
import math
import re

import pydicom.datadict
from pydicom.multival import MultiValue

from brainseg.dicom.errors import HeaderError

ORIENTATION_TOLERANCE = 1e-3  # unit length and orthogonality of the direction cosines
FLOAT32_MAX = 3.4028234663852886e38


def element_name(keyword: str) -> str:
    tag = pydicom.datadict.tag_for_keyword(keyword)
    return f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})" if tag is not None else keyword


def describe(err: Exception) -> str:
    """A pydicom error in words that cannot carry header values: its type and the tag it names."""
    match = re.search(r"\(\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)", str(err))
    if not match:
        return type(err).__name__
    tag = int(match.group(1) + match.group(2), 16)
    keyword = pydicom.datadict.keyword_for_tag(tag)
    return f"{type(err).__name__} at element ({match.group(1).upper()},{match.group(2).upper()})" + (
        f" {keyword}" if keyword else "")


def element_value(node, keyword: str):
    """An element's value, or None when absent; a value pydicom cannot decode is a HeaderError."""
    try:
        return node.get(keyword)
    except Exception as err:  # pydicom decodes lazily and raises many types on damaged values
        raise HeaderError(f"{element_name(keyword)} cannot be decoded ({describe(err)})") from None


def first_item(dataset, *path):
    """Follow sequence keywords (taking item 0 of each) and return the last attribute or None."""
    node = dataset
    for keyword in path[:-1]:
        sequence = element_value(node, keyword)
        if not sequence:
            return None
        try:
            node = sequence[0]
        except (TypeError, IndexError, KeyError):
            raise HeaderError(f"{element_name(keyword)} is not a sequence of items") from None
    return element_value(node, path[-1])


def integer(dataset, keyword: str, default: int | None = None) -> int:
    value = element_value(dataset, keyword)
    if value is None or value == "":
        if default is None:
            raise HeaderError(f"{element_name(keyword)} is missing")
        return default
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise HeaderError(f"{element_name(keyword)} is not an integer") from None


def floats(value, keyword: str, count: int) -> tuple | None:
    """``count`` finite floats from a multi-valued element, or None when absent."""
    if value is None or value == "":
        return None
    try:
        numbers = tuple(float(v) for v in (value if isinstance(value, (list, tuple, MultiValue))
                                           else [value]))
    except (TypeError, ValueError, OverflowError):
        raise HeaderError(f"{element_name(keyword)} is not a list of numbers") from None
    if len(numbers) != count:
        raise HeaderError(f"{element_name(keyword)} has {len(numbers)} value(s); expected {count}")
    if not all(math.isfinite(v) for v in numbers):
        raise HeaderError(f"{element_name(keyword)} holds a value that is not a finite number (NaN or infinity)")
    return numbers


def float_value(value, keyword: str, default: float) -> float:
    numbers = floats(value, keyword, 1)
    return default if numbers is None else numbers[0]


def shared_or_top(dataset, keyword: str, *sequence_path: str):
    """A value from the top level, else from the shared functional groups (enhanced objects)."""
    value = element_value(dataset, keyword)
    if value is None:
        value = first_item(dataset, "SharedFunctionalGroupsSequence", *sequence_path, keyword)
    return value


def frame_geometry(dataset, frames: int) -> tuple[tuple, tuple, tuple, float]:
    """Per-frame positions, orientation, pixel spacing and thickness (enhanced or classic), checked."""
    orientation = floats(shared_or_top(dataset, "ImageOrientationPatient", "PlaneOrientationSequence"),
                          "ImageOrientationPatient", 6)
    spacing = floats(shared_or_top(dataset, "PixelSpacing", "PixelMeasuresSequence"), "PixelSpacing", 2)
    thickness = float_value(shared_or_top(dataset, "SliceThickness", "PixelMeasuresSequence"), "SliceThickness", 0.0)
    per_frame = element_value(dataset, "PerFrameFunctionalGroupsSequence")
    if per_frame:
        positions = []
        for item in per_frame:
            positions.append(floats(first_item(item, "PlanePositionSequence", "ImagePositionPatient"),
                                     "ImagePositionPatient", 3))
            orientation = orientation or floats(first_item(item, "PlaneOrientationSequence",
                                                             "ImageOrientationPatient"), "ImageOrientationPatient", 6)
            spacing = spacing or floats(first_item(item, "PixelMeasuresSequence", "PixelSpacing"), "PixelSpacing", 2)
        if len(positions) != frames:
            raise HeaderError(f"NumberOfFrames is {frames} but PerFrameFunctionalGroupsSequence has "
                              f"{len(positions)} item(s); expected one per frame")
        if any(p is None for p in positions):
            raise HeaderError("a frame has no ImagePositionPatient (PlanePositionSequence)")
    else:
        position = floats(element_value(dataset, "ImagePositionPatient"), "ImagePositionPatient", 3)
        if frames != 1 and position is not None:
            raise HeaderError(f"NumberOfFrames is {frames} with one ImagePositionPatient and no per-frame positions")
        positions = [position] if position is not None else []
    if not positions or orientation is None or spacing is None:
        raise HeaderError("no image geometry (ImagePositionPatient, ImageOrientationPatient and PixelSpacing are "
                          "needed to place slices)")
    row, column = orientation[:3], orientation[3:]
    lengths = (math.fsum(v * v for v in row), math.fsum(v * v for v in column))
    if any(abs(length - 1.0) > 2 * ORIENTATION_TOLERANCE for length in lengths) or \
            abs(math.fsum(a * b for a, b in zip(row, column))) > ORIENTATION_TOLERANCE:
        raise HeaderError("ImageOrientationPatient is not two orthogonal unit vectors")
    if min(spacing) <= 0:
        raise HeaderError("PixelSpacing is not positive")
    if thickness < 0:
        raise HeaderError("SliceThickness is negative")
    return tuple(positions), orientation, spacing, thickness


def rescale(dataset, bits_stored: int, signed: bool) -> tuple[float, float]:
    """Rescale Slope and Intercept (top level, or the shared functional groups' of a multi-frame
    object), checked to map every stored value of ``bits_stored`` bits into float32, the precision
    pixels are worked in."""
    slope = element_value(dataset, "RescaleSlope")
    intercept = element_value(dataset, "RescaleIntercept")
    if slope is None:
        slope = first_item(dataset, "SharedFunctionalGroupsSequence", "PixelValueTransformationSequence",
                            "RescaleSlope")
        intercept = first_item(dataset, "SharedFunctionalGroupsSequence", "PixelValueTransformationSequence",
                                "RescaleIntercept")
    slope, intercept = float_value(slope, "RescaleSlope", 1.0), float_value(intercept, "RescaleIntercept", 0.0)
    if slope == 0.0:
        raise HeaderError("RescaleSlope is 0: every pixel would map to the intercept")
    largest_stored = 2.0 ** (bits_stored - 1 if signed else bits_stored)
    for keyword, reach in (("RescaleIntercept", abs(intercept)), ("RescaleSlope", abs(slope) * largest_stored +
                                                                  abs(intercept))):
        if reach > FLOAT32_MAX:
            raise HeaderError(f"{element_name(keyword)} takes {bits_stored}-bit stored values to {reach:.3g}, "
                              f"beyond float32 (the working precision, up to {FLOAT32_MAX:.3g}); expected a "
                              "rescale whose output fits")
    return slope, intercept


def segmentation_frames(dataset, frames: int, bits_allocated: int, encapsulated: bool) -> tuple[tuple, int]:
    """A DICOM SEG object's segment number per frame and, when FRACTIONAL, its maximum value."""
    kind = str(element_value(dataset, "SegmentationType") or "").strip().upper()
    if kind not in ("BINARY", "FRACTIONAL"):
        raise HeaderError(f"SegmentationType (0062,0001) is {kind or 'missing'}; expected BINARY or FRACTIONAL")
    if (kind, bits_allocated) not in (("BINARY", 1), ("FRACTIONAL", 8)):
        raise HeaderError(f"a {kind} segmentation with BitsAllocated {bits_allocated}; expected 1 (BINARY) or "
                          "8 (FRACTIONAL)")
    if encapsulated:
        raise HeaderError("a compressed segmentation: its frames cannot be read by byte ranges; write it with an "
                          "uncompressed transfer syntax (Explicit VR Little Endian)")
    per_frame = element_value(dataset, "PerFrameFunctionalGroupsSequence") or []
    shared = first_item(dataset, "SharedFunctionalGroupsSequence", "SegmentIdentificationSequence",
                         "ReferencedSegmentNumber")  # one segment: often given once for every frame
    numbers = [first_item(item, "SegmentIdentificationSequence", "ReferencedSegmentNumber") or shared
               for item in per_frame]
    try:
        segments = tuple(int(number) for number in numbers)
    except (TypeError, ValueError):
        segments = ()
    if len(segments) != frames or min(segments, default=0) < 1:
        raise HeaderError("a segmentation frame has no ReferencedSegmentNumber (SegmentIdentificationSequence); "
                          "expected one per frame")
    maximum = integer(dataset, "MaximumFractionalValue", 255) if kind == "FRACTIONAL" else 0
    if kind == "FRACTIONAL" and not 1 <= maximum <= 255:
        raise HeaderError(f"MaximumFractionalValue is {maximum}; expected 1 to 255")
    return segments, maximum


DESCRIPTION_CHARACTERS = 64  # SeriesDescription and ProtocolName are LO: 64 characters at most


# Where a legacy-converted enhanced object (PS3.3 C.7.6.16.2.25) keeps the classic elements that no
# functional group takes: a series' sequence name, MR timing and acquisition type among them.
UNASSIGNED = ("SharedFunctionalGroupsSequence", "UnassignedSharedConvertedAttributesSequence")


def _text(dataset, keyword: str) -> str:
    """A text element as one printable line (several values joined by backslashes); "" when absent or damaged.
    A legacy-converted object's unassigned shared attributes count as its own."""
    try:
        value = element_value(dataset, keyword)
        if value is None:
            value = first_item(dataset, *UNASSIGNED, keyword)
    except HeaderError:
        return ""
    if value is None:
        return ""
    values = value if isinstance(value, (list, tuple, MultiValue)) else [value]
    text = "\\".join(str(item) for item in values)
    return "".join(ch if ch.isprintable() else " " for ch in text).strip()[:DESCRIPTION_CHARACTERS]


def _number(dataset, *path) -> float:
    """A number (an element, or one inside the shared functional groups of an enhanced object, or
    among a legacy-converted object's unassigned shared attributes); 0.0 when absent, damaged or not finite."""
    for node_path in (path, ("SharedFunctionalGroupsSequence", *path), (*UNASSIGNED, *path)):
        try:
            value = first_item(dataset, *node_path) if len(node_path) > 1 else element_value(dataset, node_path[0])
            if isinstance(value, (list, tuple, MultiValue)):
                value = value[0] if len(value) else None
            number = float(value) if value not in (None, "") else None
        except (HeaderError, TypeError, ValueError, OverflowError, IndexError):
            number = None
        if number is not None and math.isfinite(number):
            return number
    return 0.0


def _day(text: str) -> int:
    """A DICOM date (``YYYYMMDD``) as its proleptic Gregorian ordinal; 0 when unreadable."""
    digits = text.strip().replace(".", "").replace("-", "")
    if not digits.isdigit() or len(digits) != 8:
        return 0
    try:
        return datetime.date(int(digits[:4]), int(digits[4:6]), int(digits[6:])).toordinal()
    except ValueError:
        return 0


def _seconds(text: str) -> float:
    """A DICOM time (``HHMMSS.FFFFFF``, parts optional) as seconds since midnight; -1.0 when unreadable."""
    digits, _, fraction = text.strip().replace(":", "").partition(".")
    if not digits.isdigit() or len(digits) not in (2, 4, 6):
        return -1.0
    hours, minutes, seconds = int(digits[:2]), int(digits[2:4] or 0), int(digits[4:6] or 0)
    if hours > 23 or minutes > 59 or seconds > 60:
        return -1.0
    extra = float("0." + fraction) if fraction.isdigit() else 0.0
    return float(hours * 3600 + minutes * 60 + seconds) + extra


def acquisition_fields(dataset) -> dict:
    """What a series says about how it was acquired, for telling sequences apart: descriptions,
    sequence names, MR timing, contrast agent, image type, series number, day and time. Never
    raises: a damaged value reads as absent (it describes the series; the pixels do not depend on it)."""
    try:
        number = int(str(element_value(dataset, "SeriesNumber") or 0).strip() or 0)
    except (HeaderError, ValueError, TypeError, OverflowError):
        number = 0
    return dict(
        series_number=number if abs(number) < 2**31 else 0,
        series_day=next((day for keyword in ("SeriesDate", "AcquisitionDate", "StudyDate")
                         if (day := _day(_text(dataset, keyword)))), 0),
        series_time=_seconds(_text(dataset, "SeriesTime")),
        description=_text(dataset, "SeriesDescription"),
        protocol=_text(dataset, "ProtocolName"),
        sequence_name=_text(dataset, "SequenceName") or _text(dataset, "PulseSequenceName"),
        scanning_sequence=_text(dataset, "ScanningSequence").upper(),
        sequence_variant=_text(dataset, "SequenceVariant").upper(),
        acquisition_type=_text(dataset, "MRAcquisitionType").upper(),
        repetition_time=_number(dataset, "MRTimingAndRelatedParametersSequence", "RepetitionTime")
        or _number(dataset, "RepetitionTime"),
        echo_time=_number(dataset, "EchoTime") or _number(dataset, "MREchoSequence", "EffectiveEchoTime"),
        inversion_time=_number(dataset, "InversionTime") or _number(dataset, "MRModifierSequence", "InversionTimes"),
        contrast_agent=_text(dataset, "ContrastBolusAgent"),
        image_type=_text(dataset, "ImageType").upper(),
    )
