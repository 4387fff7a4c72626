"""Parse a DICOM object's header from its first bytes and locate its pixel data.

The caller fetches a prefix of the object with a ranged read and calls :func:`parse_header`.
When the prefix ends before the Pixel Data element (or before the Basic Offset Table of
encapsulated data), :class:`NeedMoreBytes` says how many bytes to fetch instead.

Any byte may be wrong. Every failure becomes a :class:`HeaderError` whose message names the
element and what was expected, never a value read from the file: header values may identify a
patient. :class:`NotDicom` and :class:`NotAnImage` mark objects that are not images at all (a text
file, a DICOMDIR, a structured report), which a series may hold beside its slices. The result,
:class:`ObjectHeader`, holds only technical fields; identifiers (patient ID, series and instance
UIDs) are kept only as keyed hashes, for grouping and comparing.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import math
import re
import struct
from dataclasses import dataclass, fields

import pydicom
import pydicom.datadict
from pydicom.multival import MultiValue
from pydicom.uid import UID

PIXEL_DATA_TAG = (0x7FE0, 0x0010)
ITEM_TAG = (0xFFFE, 0xE000)
NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still found in archives)
}
PIXEL_VRS = (b"OB", b"OW", b"OF", b"OD", b"UN")
PREAMBLE_BYTES = 132  # 128-byte preamble and "DICM"
ORIENTATION_TOLERANCE = 1e-3  # unit length and orthogonality of the direction cosines
IMAGE_CLASSES_WITHOUT_IMAGE_IN_NAME = {"Segmentation Storage", "Parametric Map Storage"}
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
IDENTITY_DIGITS = 16  # hex digits kept of each keyed hash


class HeaderError(ValueError):
    """The object is not a DICOM image this project can read; the message says why."""


class NotDicom(HeaderError):
    """The object is not a DICOM Part 10 file."""


class NotAnImage(HeaderError):
    """A DICOM object without image pixels (DICOMDIR, report, presentation state, ...)."""


class NeedMoreBytes(Exception):
    """The prefix is too short; fetch at least ``size`` bytes and parse again."""

    def __init__(self, size: int):
        super().__init__(f"need {size} bytes")
        self.size = size


@dataclass(frozen=True, slots=True)
class ObjectHeader:
    """What a region read needs to know about one DICOM object.

    Offsets are absolute byte positions in the object. For native (uncompressed) syntaxes,
    ``pixel_offset`` is the first pixel byte and frames follow each other. For encapsulated
    syntaxes, ``frame_starts`` holds the offset of each frame's first item when the Basic (or
    Extended) Offset Table gives it, else it is empty. ``series_hash``, ``instance_hash`` and
    ``patient_hash`` are keyed hashes of SeriesInstanceUID, SOPInstanceUID and PatientID.
    """

    transfer_syntax: str
    rows: int
    columns: int
    frames: int
    bits_allocated: int
    bits_stored: int
    pixel_signed: bool
    samples_per_pixel: int
    photometric: str
    big_endian: bool
    encapsulated: bool
    rescale_slope: float
    rescale_intercept: float
    positions: tuple  # ((x, y, z) in mm, one per frame)
    orientation: tuple  # (row cosines, column cosines): six floats
    pixel_spacing: tuple  # (between rows, between columns) in mm
    slice_thickness: float
    series_hash: str
    instance_hash: str
    modality: str
    patient_hash: str
    pixel_offset: int
    pixel_length: int  # -1 when encapsulated (undefined length)
    frame_starts: tuple = ()
    segments: tuple = ()  # a DICOM SEG object: the segment number of each frame
    fractional_max: int = 0  # a FRACTIONAL SEG: the value that means "all of the voxel"; 0: BINARY

    @property
    def is_segmentation(self) -> bool:
        return bool(self.segments)

    @property
    def bytes_per_pixel(self) -> int:
        return self.bits_allocated // 8

    @property
    def frame_bytes(self) -> int:
        return self.rows * self.columns * self.bytes_per_pixel * self.samples_per_pixel

    @property
    def pixel_bytes(self) -> int:
        """Bytes every frame's pixels need together (1-bit SEG frames are packed without padding)."""
        if self.bits_allocated == 1:
            return -(-self.rows * self.columns * self.frames // 8)
        return self.frame_bytes * self.frames

    def to_row(self) -> list:
        """The field values in declaration order (a compact JSON form)."""
        return [getattr(self, name) for name in _FIELD_NAMES]

    @classmethod
    def from_row(cls, row: list) -> ObjectHeader:
        """Inverse of :meth:`to_row`. Values every slice of a series repeats are shared, so a
        catalog of many thousands of objects stays small."""
        values = dict(zip(_FIELD_NAMES, row, strict=True))
        values["positions"] = tuple(tuple(p) for p in values["positions"])
        values["frame_starts"] = tuple(values["frame_starts"])
        values["segments"] = tuple(values["segments"])
        for name in _SHARED_FIELDS:
            value = values[name]
            value = tuple(value) if isinstance(value, list) else value
            values[name] = _shared.setdefault((name, value), value)
        return cls(**values)


_FIELD_NAMES = tuple(f.name for f in fields(ObjectHeader))
_SHARED_FIELDS = ("transfer_syntax", "photometric", "orientation", "pixel_spacing", "series_hash",
                  "modality", "patient_hash", "rescale_slope", "rescale_intercept", "slice_thickness")
_shared: dict = {}


def identity_hash(key: bytes, value: str) -> str:
    """A keyed hash (HMAC-SHA256) of an identifier: equal identifiers give equal hashes, and
    without the key a guess cannot be checked against it."""
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:IDENTITY_DIGITS]


def _element_name(keyword: str) -> str:
    tag = pydicom.datadict.tag_for_keyword(keyword)
    return f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})" if tag is not None else keyword


def _describe(err: Exception) -> str:
    """A pydicom error in words that cannot carry header values: its type and the tag it names."""
    match = re.search(r"\(\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)", str(err))
    if not match:
        return type(err).__name__
    tag = int(match.group(1) + match.group(2), 16)
    keyword = pydicom.datadict.keyword_for_tag(tag)
    return f"{type(err).__name__} at element ({match.group(1).upper()},{match.group(2).upper()})" + (
        f" {keyword}" if keyword else "")


def _value(node, keyword: str):
    """An element's value, or None when absent; a value pydicom cannot decode is a HeaderError."""
    try:
        return node.get(keyword)
    except Exception as err:  # pydicom decodes lazily and raises many types on damaged values
        raise HeaderError(f"{_element_name(keyword)} cannot be decoded ({_describe(err)})") from None


def _first_item(dataset, *path):
    """Follow sequence keywords (taking item 0 of each) and return the last attribute or None."""
    node = dataset
    for keyword in path[:-1]:
        sequence = _value(node, keyword)
        if not sequence:
            return None
        try:
            node = sequence[0]
        except (TypeError, IndexError, KeyError):
            raise HeaderError(f"{_element_name(keyword)} is not a sequence of items") from None
    return _value(node, path[-1])


def _integer(dataset, keyword: str, default: int | None = None) -> int:
    value = _value(dataset, keyword)
    if value is None or value == "":
        if default is None:
            raise HeaderError(f"{_element_name(keyword)} is missing")
        return default
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise HeaderError(f"{_element_name(keyword)} is not an integer") from None


def _floats(value, keyword: str, count: int) -> tuple | None:
    """``count`` finite floats from a multi-valued element, or None when absent."""
    if value is None or value == "":
        return None
    try:
        numbers = tuple(float(v) for v in (value if isinstance(value, (list, tuple, MultiValue))
                                           else [value]))
    except (TypeError, ValueError, OverflowError):
        raise HeaderError(f"{_element_name(keyword)} is not a list of numbers") from None
    if len(numbers) != count:
        raise HeaderError(f"{_element_name(keyword)} has {len(numbers)} value(s); expected {count}")
    if not all(math.isfinite(v) for v in numbers):
        raise HeaderError(f"{_element_name(keyword)} holds a value that is not a finite number (NaN or infinity)")
    return numbers


def _float(value, keyword: str, default: float) -> float:
    numbers = _floats(value, keyword, 1)
    return default if numbers is None else numbers[0]


def _shared_or_top(dataset, keyword: str, *sequence_path: str):
    """A value from the top level, else from the shared functional groups (enhanced objects)."""
    value = _value(dataset, keyword)
    if value is None:
        value = _first_item(dataset, "SharedFunctionalGroupsSequence", *sequence_path, keyword)
    return value


def _frame_geometry(dataset, frames: int) -> tuple[tuple, tuple, tuple, float]:
    """Per-frame positions, orientation, pixel spacing and thickness (enhanced or classic), checked."""
    orientation = _floats(_shared_or_top(dataset, "ImageOrientationPatient", "PlaneOrientationSequence"),
                          "ImageOrientationPatient", 6)
    spacing = _floats(_shared_or_top(dataset, "PixelSpacing", "PixelMeasuresSequence"), "PixelSpacing", 2)
    thickness = _float(_shared_or_top(dataset, "SliceThickness", "PixelMeasuresSequence"), "SliceThickness", 0.0)
    per_frame = _value(dataset, "PerFrameFunctionalGroupsSequence")
    if per_frame:
        positions = []
        for item in per_frame:
            positions.append(_floats(_first_item(item, "PlanePositionSequence", "ImagePositionPatient"),
                                     "ImagePositionPatient", 3))
            orientation = orientation or _floats(_first_item(item, "PlaneOrientationSequence",
                                                             "ImageOrientationPatient"), "ImageOrientationPatient", 6)
            spacing = spacing or _floats(_first_item(item, "PixelMeasuresSequence", "PixelSpacing"), "PixelSpacing", 2)
        if len(positions) != frames:
            raise HeaderError(f"NumberOfFrames is {frames} but PerFrameFunctionalGroupsSequence has "
                              f"{len(positions)} item(s); expected one per frame")
        if any(p is None for p in positions):
            raise HeaderError("a frame has no ImagePositionPatient (PlanePositionSequence)")
    else:
        position = _floats(_value(dataset, "ImagePositionPatient"), "ImagePositionPatient", 3)
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


def _rescale(dataset) -> tuple[float, float]:
    slope = _value(dataset, "RescaleSlope")
    intercept = _value(dataset, "RescaleIntercept")
    if slope is None:
        slope = _first_item(dataset, "SharedFunctionalGroupsSequence", "PixelValueTransformationSequence",
                            "RescaleSlope")
        intercept = _first_item(dataset, "SharedFunctionalGroupsSequence", "PixelValueTransformationSequence",
                                "RescaleIntercept")
    slope, intercept = _float(slope, "RescaleSlope", 1.0), _float(intercept, "RescaleIntercept", 0.0)
    if slope == 0.0:
        raise HeaderError("RescaleSlope is 0: every pixel would map to the intercept")
    return slope, intercept


def _pixel_element(prefix: bytes, position: int, implicit: bool, big_endian: bool) -> tuple[int, int]:
    """Offset of the first value byte and the value length (-1: undefined) of Pixel Data."""
    endian = ">" if big_endian else "<"
    group, element = struct.unpack_from(endian + "HH", prefix, position)
    if (group, element) != PIXEL_DATA_TAG:
        raise HeaderError(f"expected the Pixel Data tag at byte {position}, found ({group:04X},{element:04X})")
    if implicit:
        (length,) = struct.unpack_from(endian + "I", prefix, position + 4)
        header_size = 8
    else:
        if prefix[position + 4:position + 6] not in PIXEL_VRS:
            raise HeaderError(f"the Pixel Data element at byte {position} has no valid value representation "
                              "(expected OB or OW)")
        (length,) = struct.unpack_from(endian + "I", prefix, position + 8)
        header_size = 12
    return position + header_size, (-1 if length == 0xFFFFFFFF else length)


def _frame_starts(dataset, prefix: bytes, value_offset: int, frames: int, object_size: int) -> tuple:
    """Frame offsets from the Extended or Basic Offset Table (always little endian), checked to lie
    inside the object in increasing order."""
    if value_offset + 8 > len(prefix):
        raise NeedMoreBytes(min(object_size, value_offset + 8))
    group, element, table_length = struct.unpack_from("<HHI", prefix, value_offset)
    if (group, element) != ITEM_TAG:
        raise HeaderError("encapsulated Pixel Data does not start with a Basic Offset Table item")
    first_fragment = value_offset + 8 + table_length
    extended = _value(dataset, "ExtendedOffsetTable")
    if extended is not None:
        if len(extended) % 8:
            raise HeaderError(f"{_element_name('ExtendedOffsetTable')} is not a list of 8-byte offsets")
        offsets = struct.unpack(f"<{len(extended) // 8}Q", bytes(extended))
    elif table_length:
        if table_length % 4 or first_fragment > object_size:
            raise HeaderError(f"the Basic Offset Table declares {table_length} bytes; expected 4 per frame inside "
                              f"the object's {object_size} bytes")
        if first_fragment > len(prefix):
            raise NeedMoreBytes(min(object_size, first_fragment))
        offsets = struct.unpack_from(f"<{table_length // 4}I", prefix, value_offset + 8)
    elif frames == 1:
        offsets = (0,)
    else:
        return ()
    if len(offsets) != frames:
        return ()
    starts = tuple(first_fragment + int(offset) for offset in offsets)
    if any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] + 8 > object_size:
        raise HeaderError("the offset table of the encapsulated Pixel Data points outside the object or out of order")
    return starts


def _sop_class_name(dataset) -> str:
    uid = _value(dataset.file_meta, "MediaStorageSOPClassUID") or _value(dataset, "SOPClassUID")
    name = UID(str(uid)).name if uid else ""
    return name if name and name != str(uid) else ""  # a registered class, never an arbitrary UID's text


def _carries_pixels(sop_class: str, dataset) -> bool:
    return ("Image Storage" in sop_class or sop_class in IMAGE_CLASSES_WITHOUT_IMAGE_IN_NAME
            or _value(dataset, "Rows") is not None)


def _found_encoding(prefix: bytes) -> tuple[bool, bool] | None:
    """``(implicit VR, little endian)`` as the data set's first element is actually written, or
    None when the file meta has no group length to find it by. The first element's group is a
    small number (0008 most often), so the byte order that reads it smaller is the true one;
    explicit VR puts two capital letters after the tag."""
    if prefix[PREAMBLE_BYTES:PREAMBLE_BYTES + 6] != b"\x02\x00\x00\x00UL":
        return None
    (meta_length,) = struct.unpack_from("<I", prefix, PREAMBLE_BYTES + 8)
    start = PREAMBLE_BYTES + 12 + meta_length
    if start + 6 > len(prefix):
        return None
    little = struct.unpack_from("<H", prefix, start)[0] <= struct.unpack_from(">H", prefix, start)[0]
    explicit = all(0x41 <= byte <= 0x5A for byte in prefix[start + 4:start + 6])
    return not explicit, little


def _transfer_syntax(dataset, prefix: bytes) -> UID:
    """The declared transfer syntax, checked to be one and to match how the data set is encoded."""
    value = _value(dataset.file_meta, "TransferSyntaxUID")
    if not value:
        raise HeaderError("no Transfer Syntax UID in the file meta information")
    uid = UID(str(value))
    if not uid.is_transfer_syntax:
        what = f"a {uid.name} UID" if uid.name != str(uid) else "an unregistered UID"
        raise HeaderError(f"TransferSyntaxUID (0002,0010) holds {what}, not a transfer syntax")
    if str(uid) not in NATIVE_SYNTAXES and not uid.is_compressed:
        raise HeaderError(f"unsupported transfer syntax {uid} ({uid.name}): pixel data cannot be located by byte "
                          "ranges; re-encode the object")
    found = _found_encoding(prefix)
    if found is not None and found != (uid.is_implicit_VR, uid.is_little_endian):
        implicit, little = found
        found = f"{'Implicit' if implicit else 'Explicit'} VR {'Little' if little else 'Big'} Endian"
        raise HeaderError(f"the file meta declares {uid.name} but the data set is encoded as {found}; write the "
                          "object again with its true transfer syntax")
    return uid


def parse_header(prefix: bytes, object_size: int, identity_key: bytes = b"") -> ObjectHeader:
    """Parse the header of a DICOM object from its first ``len(prefix)`` bytes.

    Args:
        prefix: the object's first bytes (the whole object when ``len(prefix) == object_size``).
        object_size: the object's full size in bytes.
        identity_key: the key of the identifier hashes (see :func:`identity_hash`).

    Raises:
        NeedMoreBytes: the prefix ends before the pixel data (or its offset table).
        NotDicom: not a DICOM Part 10 file.
        NotAnImage: a DICOM object that carries no image.
        HeaderError: a damaged or unsupported image object; the message names the element.
    """
    complete = len(prefix) >= object_size
    if not complete and len(prefix) < PREAMBLE_BYTES:
        raise NeedMoreBytes(min(object_size, 4096))
    if prefix[128:132] != b"DICM":
        raise NotDicom("not a DICOM file (no 'DICM' marker after the 128-byte preamble)")
    stream = io.BytesIO(prefix)
    try:
        dataset = pydicom.dcmread(stream, stop_before_pixels=True)
        position = stream.tell()
    except Exception as err:  # pydicom raises many types on truncated or corrupt input
        if not complete:
            raise NeedMoreBytes(min(object_size, 4 * len(prefix))) from None
        raise HeaderError(f"the header cannot be parsed (near byte {stream.tell()}: {_describe(err)})") from None
    found_pixels = position + 12 <= len(prefix) and prefix[position:position + 4] in (b"\xe0\x7f\x10\x00",
                                                                                   b"\x7f\xe0\x00\x10")
    if not found_pixels:
        if not complete:
            raise NeedMoreBytes(min(object_size, max(4 * len(prefix), position + 4096)))
        sop_class = _sop_class_name(dataset)
        if _carries_pixels(sop_class, dataset):
            raise HeaderError(f"the header ends at byte {position} of {object_size} without Pixel Data, but "
                              f"{'a ' + sop_class if sop_class else 'an image'} object carries pixel data "
                              "(truncated object?)")
        raise NotAnImage(f"no pixel data: a {sop_class} object" if sop_class else
                         "no pixel data and no registered SOP class: taken for a non-image object")
    uid = _transfer_syntax(dataset, prefix)
    big_endian = not uid.is_little_endian
    encapsulated = str(uid) not in NATIVE_SYNTAXES
    value_offset, length = _pixel_element(prefix, position, uid.is_implicit_VR, big_endian)

    frames = _integer(dataset, "NumberOfFrames", 1)
    samples = _integer(dataset, "SamplesPerPixel", 1)
    bits_allocated = _integer(dataset, "BitsAllocated", 0)
    bits_stored = _integer(dataset, "BitsStored", bits_allocated)
    rows, columns = _integer(dataset, "Rows", 0), _integer(dataset, "Columns", 0)
    photometric = str(_value(dataset, "PhotometricInterpretation") or "MONOCHROME2").strip()
    segmentation = str(_value(dataset.file_meta, "MediaStorageSOPClassUID") or _value(dataset, "SOPClassUID")
                       or "") == SEGMENTATION_STORAGE
    if samples != 1:
        raise HeaderError(f"{samples} samples per pixel; expected a greyscale image with 1 sample per pixel")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise HeaderError("PhotometricInterpretation is not MONOCHROME1 or MONOCHROME2 (a greyscale image)")
    segments, fractional_max = _segmentation(dataset, frames, bits_allocated, encapsulated) if segmentation else ((), 0)
    if bits_allocated not in ((1, 8) if segmentation else (8, 16, 32)):
        raise HeaderError(f"BitsAllocated is {bits_allocated}; expected 8, 16 or 32")
    if not 1 <= bits_stored <= bits_allocated:
        raise HeaderError(f"BitsStored is {bits_stored}; expected 1 to BitsAllocated ({bits_allocated})")
    if rows <= 0 or columns <= 0:
        raise HeaderError("Rows or Columns missing or zero")
    if frames < 1:
        raise HeaderError(f"NumberOfFrames is {frames}; expected at least 1")
    representation = _integer(dataset, "PixelRepresentation", 0)
    if representation not in (0, 1):
        raise HeaderError(f"PixelRepresentation is {representation}; expected 0 (unsigned) or 1 (signed)")
    positions, orientation, spacing, thickness = _frame_geometry(dataset, frames)
    slope, intercept = _rescale(dataset)
    header_fields = dict(
        transfer_syntax=str(uid),
        rows=rows,
        columns=columns,
        frames=frames,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        pixel_signed=representation == 1,
        samples_per_pixel=samples,
        photometric=photometric,
        big_endian=big_endian,
        encapsulated=encapsulated,
        rescale_slope=slope,
        rescale_intercept=intercept,
        positions=positions,
        orientation=orientation,
        pixel_spacing=spacing,
        slice_thickness=thickness,
        series_hash=_hashed(identity_key, _value(dataset, "SeriesInstanceUID")),
        instance_hash=_hashed(identity_key, _value(dataset, "SOPInstanceUID")),
        modality=re.sub(r"[^A-Z0-9]", "", str(_value(dataset, "Modality") or ""))[:16],
        patient_hash=_hashed(identity_key, _value(dataset, "PatientID")),
        pixel_offset=value_offset,
        pixel_length=length,
        segments=segments,
        fractional_max=fractional_max,
    )
    if encapsulated:
        if length != -1:
            raise HeaderError("encapsulated Pixel Data must have undefined length")
        header_fields["frame_starts"] = _frame_starts(dataset, prefix, value_offset, frames, object_size)
    header = ObjectHeader(**header_fields)
    needed = header.pixel_bytes
    if not encapsulated:
        what = f"{needed} bytes that {frames} frame(s) of {rows}x{columns}x{bits_allocated} bits need"
        if length < needed:
            raise HeaderError(f"the Pixel Data element declares {max(length, 0)} of the {what}")
        if length > needed + 1:  # one byte of padding makes an odd length even
            raise HeaderError(f"the Pixel Data element declares {length} bytes, more than the {what}: Rows, "
                              "Columns, BitsAllocated or NumberOfFrames is wrong")
        held = object_size - value_offset
        if held < needed:
            raise HeaderError(f"Pixel Data holds {max(held, 0)} of the {what} (truncated object?)")
    return header


def _segmentation(dataset, frames: int, bits_allocated: int, encapsulated: bool) -> tuple[tuple, int]:
    """A DICOM SEG object's segment number per frame and, when FRACTIONAL, its maximum value."""
    kind = str(_value(dataset, "SegmentationType") or "").strip().upper()
    if kind not in ("BINARY", "FRACTIONAL"):
        raise HeaderError(f"SegmentationType (0062,0001) is {kind or 'missing'}; expected BINARY or FRACTIONAL")
    if (kind, bits_allocated) not in (("BINARY", 1), ("FRACTIONAL", 8)):
        raise HeaderError(f"a {kind} segmentation with BitsAllocated {bits_allocated}; expected 1 (BINARY) or "
                          "8 (FRACTIONAL)")
    if encapsulated:
        raise HeaderError("a compressed segmentation: its frames cannot be read by byte ranges; write it with an "
                          "uncompressed transfer syntax (Explicit VR Little Endian)")
    per_frame = _value(dataset, "PerFrameFunctionalGroupsSequence") or []
    shared = _first_item(dataset, "SharedFunctionalGroupsSequence", "SegmentIdentificationSequence",
                         "ReferencedSegmentNumber")  # one segment: often given once for every frame
    numbers = [_first_item(item, "SegmentIdentificationSequence", "ReferencedSegmentNumber") or shared
               for item in per_frame]
    try:
        segments = tuple(int(number) for number in numbers)
    except (TypeError, ValueError):
        segments = ()
    if len(segments) != frames or min(segments, default=0) < 1:
        raise HeaderError("a segmentation frame has no ReferencedSegmentNumber (SegmentIdentificationSequence); "
                          "expected one per frame")
    maximum = _integer(dataset, "MaximumFractionalValue", 255) if kind == "FRACTIONAL" else 0
    if kind == "FRACTIONAL" and not 1 <= maximum <= 255:
        raise HeaderError(f"MaximumFractionalValue is {maximum}; expected 1 to 255")
    return segments, maximum


def _hashed(key: bytes, identifier) -> str:
    """The identifier's keyed hash, or "" when it is absent or blank."""
    text = str(identifier or "").strip()
    return identity_hash(key, text) if text else ""


def element_beyond(prefix: bytes, limit: int) -> str:
    """Which top-level element of the data set runs past byte ``limit`` (for a reason, never a value).

    Walks the elements after the file meta (explicit or implicit VR, little endian, as most
    objects are) until one ends beyond ``limit``; returns its tag and declared size, or "".
    """
    try:
        (meta_length,) = struct.unpack_from("<I", prefix, PREAMBLE_BYTES + 8)
        position = PREAMBLE_BYTES + 12 + meta_length
        explicit = 0x40 < prefix[position + 4] < 0x5B and 0x40 < prefix[position + 5] < 0x5B
        while position + 8 <= len(prefix):
            group, element = struct.unpack_from("<HH", prefix, position)
            vr = prefix[position + 4:position + 6]
            if explicit and vr in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UC", b"UN", b"UR", b"UT"):
                (length,) = struct.unpack_from("<I", prefix, position + 8)
                header = 12
            elif explicit:
                (length,) = struct.unpack_from("<H", prefix, position + 6)
                header = 8
            else:
                (length,) = struct.unpack_from("<I", prefix, position + 4)
                header = 8
            keyword = pydicom.datadict.keyword_for_tag((group << 16) | element)
            name = f"({group:04X},{element:04X})" + (f" {keyword}" if keyword else "")
            if length == 0xFFFFFFFF:
                return f"element {name} has undefined length and runs past byte {limit}"
            if position + header + length > limit:
                return f"element {name} declares {length:,} bytes"
            position += header + length
    except (struct.error, IndexError):
        return ""
    return ""
