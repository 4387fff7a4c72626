"""Parse a DICOM object's header from its first bytes and locate its pixel data.

The caller fetches a prefix of the object with a ranged read and calls :func:`parse_header`.
When the prefix ends before the Pixel Data element (or before the Basic Offset Table of
encapsulated data), :class:`NeedMoreBytes` says how many bytes to fetch instead. The result,
:class:`ObjectHeader`, holds only technical fields: never names, IDs or dates of the patient
(the patient ID is kept only as a salted hash, to keep one patient's cases in one split).
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from dataclasses import dataclass, fields

import pydicom
import pydicom.errors
from pydicom.uid import UID

PIXEL_DATA_TAG = (0x7FE0, 0x0010)
ITEM_TAG = (0xFFFE, 0xE000)
NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still found in archives)
}
PREAMBLE_BYTES = 132  # 128-byte preamble and "DICM"
PATIENT_HASH_SALT = b"brainseg-patient-v1"


class HeaderError(ValueError):
    """The object is not a DICOM image this project can read; the message says why."""


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
    Extended) Offset Table gives it, else it is empty.
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
    series_uid: str
    sop_uid: str
    modality: str
    patient_hash: str
    pixel_offset: int
    pixel_length: int  # -1 when encapsulated (undefined length)
    frame_starts: tuple = ()

    @property
    def bytes_per_pixel(self) -> int:
        return self.bits_allocated // 8

    @property
    def frame_bytes(self) -> int:
        return self.rows * self.columns * self.bytes_per_pixel * self.samples_per_pixel

    def to_row(self) -> list:
        """The field values in declaration order (a compact JSON form)."""
        return [getattr(self, name) for name in _FIELD_NAMES]

    @classmethod
    def from_row(cls, row: list) -> "ObjectHeader":
        """Inverse of :meth:`to_row`. Values every slice of a series repeats are shared, so a
        catalog of many thousands of objects stays small."""
        values = dict(zip(_FIELD_NAMES, row))
        values["positions"] = tuple(tuple(p) for p in values["positions"])
        values["frame_starts"] = tuple(values["frame_starts"])
        for name in _SHARED_FIELDS:
            value = values[name]
            value = tuple(value) if isinstance(value, list) else value
            values[name] = _shared.setdefault((name, value), value)
        return cls(**values)


_FIELD_NAMES = tuple(f.name for f in fields(ObjectHeader))
_SHARED_FIELDS = ("transfer_syntax", "photometric", "orientation", "pixel_spacing", "series_uid",
                  "modality", "patient_hash", "rescale_slope", "rescale_intercept", "slice_thickness")
_shared: dict = {}


def _float_list(value, count: int) -> tuple | None:
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count else None


def _first_item(dataset, *path):
    """Follow sequence keywords (taking item 0 of each) and return the last attribute or None."""
    node = dataset
    for keyword in path[:-1]:
        sequence = node.get(keyword)
        if not sequence:
            return None
        node = sequence[0]
    return node.get(path[-1])


def _patient_hash(dataset) -> str:
    patient_id = str(dataset.get("PatientID", "") or "")
    if not patient_id:
        return ""
    return hashlib.sha256(PATIENT_HASH_SALT + patient_id.encode()).hexdigest()[:16]


def _frame_geometry(dataset, frames: int) -> tuple[tuple, tuple | None, tuple | None, float]:
    """Per-frame positions, orientation, pixel spacing and thickness (enhanced or classic)."""
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    orientation = _float_list(dataset.get("ImageOrientationPatient"), 6) or _float_list(
        _first_item(dataset, "SharedFunctionalGroupsSequence", "PlaneOrientationSequence",
                    "ImageOrientationPatient"), 6)
    spacing = _float_list(dataset.get("PixelSpacing"), 2) or _float_list(
        _first_item(dataset, "SharedFunctionalGroupsSequence", "PixelMeasuresSequence",
                    "PixelSpacing"), 2)
    thickness = dataset.get("SliceThickness") or _first_item(
        dataset, "SharedFunctionalGroupsSequence", "PixelMeasuresSequence", "SliceThickness")
    if per_frame:
        positions = []
        for item in per_frame:
            position = _float_list(_first_item(item, "PlanePositionSequence",
                                               "ImagePositionPatient"), 3)
            positions.append(position)
            orientation = orientation or _float_list(
                _first_item(item, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
            spacing = spacing or _float_list(
                _first_item(item, "PixelMeasuresSequence", "PixelSpacing"), 2)
        if len(positions) != frames or any(p is None for p in positions):
            positions = []
    else:
        position = _float_list(dataset.get("ImagePositionPatient"), 3)
        positions = [position] if position is not None and frames == 1 else []
    return tuple(positions), orientation, spacing, float(thickness or 0.0)


def _rescale(dataset) -> tuple[float, float]:
    slope = dataset.get("RescaleSlope")
    intercept = dataset.get("RescaleIntercept")
    if slope is None:
        slope = _first_item(dataset, "SharedFunctionalGroupsSequence",
                            "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _first_item(dataset, "SharedFunctionalGroupsSequence",
                                "PixelValueTransformationSequence", "RescaleIntercept")
    return float(slope if slope is not None else 1.0), float(intercept if intercept is not None else 0.0)


def _pixel_element(prefix: bytes, position: int, implicit: bool, big_endian: bool) -> tuple[int, int]:
    """Offset of the first value byte and the value length (-1: undefined) of Pixel Data."""
    endian = ">" if big_endian else "<"
    group, element = struct.unpack_from(endian + "HH", prefix, position)
    if (group, element) != PIXEL_DATA_TAG:
        raise HeaderError(f"expected the Pixel Data tag at byte {position}, "
                          f"found ({group:04X},{element:04X})")
    if implicit:
        (length,) = struct.unpack_from(endian + "I", prefix, position + 4)
        header_size = 8
    else:
        (length,) = struct.unpack_from(endian + "I", prefix, position + 8)
        header_size = 12
    return position + header_size, (-1 if length == 0xFFFFFFFF else length)


def _frame_starts(dataset, prefix: bytes, value_offset: int, frames: int, object_size: int) -> tuple:
    """Frame offsets from the Extended or Basic Offset Table (always little endian)."""
    if value_offset + 8 > len(prefix):
        raise NeedMoreBytes(min(object_size, value_offset + 8))
    group, element, table_length = struct.unpack_from("<HHI", prefix, value_offset)
    if (group, element) != ITEM_TAG:
        raise HeaderError("encapsulated Pixel Data does not start with a Basic Offset Table item")
    first_fragment = value_offset + 8 + table_length
    extended = dataset.get("ExtendedOffsetTable")
    if extended is not None:
        offsets = struct.unpack(f"<{len(extended) // 8}Q", bytes(extended))
    elif table_length:
        if value_offset + 8 + table_length > len(prefix):
            raise NeedMoreBytes(min(object_size, value_offset + 8 + table_length))
        offsets = struct.unpack_from(f"<{table_length // 4}I", prefix, value_offset + 8)
    elif frames == 1:
        offsets = (0,)
    else:
        return ()
    if len(offsets) != frames:
        return ()
    return tuple(first_fragment + int(offset) for offset in offsets)


def parse_header(prefix: bytes, object_size: int) -> ObjectHeader:
    """Parse the header of a DICOM object from its first ``len(prefix)`` bytes.

    Args:
        prefix: the object's first bytes (the whole object when ``len(prefix) == object_size``).
        object_size: the object's full size in bytes.

    Raises:
        NeedMoreBytes: the prefix ends before the pixel data (or its offset table).
        HeaderError: the object is not DICOM, has no pixel data, or has a pixel format this
            project does not read.
    """
    complete = len(prefix) >= object_size
    if not complete and len(prefix) < PREAMBLE_BYTES:
        raise NeedMoreBytes(min(object_size, 4096))
    stream = io.BytesIO(prefix)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(stream, stop_before_pixels=True)
            position = stream.tell()
            transfer_syntax = str(dataset.file_meta.get("TransferSyntaxUID", ""))
            rows = int(dataset.get("Rows", 0) or 0)
    except pydicom.errors.InvalidDicomError as err:
        raise HeaderError(f"not a DICOM file ({err})") from err
    except Exception as err:  # pydicom raises many types on truncated or corrupt input
        if not complete:
            raise NeedMoreBytes(min(object_size, 4 * len(prefix))) from err
        raise HeaderError(f"unreadable DICOM: {type(err).__name__}: {err}") from err
    if position + 12 > len(prefix) or prefix[position:position + 4] not in (b"\xe0\x7f\x10\x00",
                                                                           b"\x7f\xe0\x00\x10"):
        if not complete:
            raise NeedMoreBytes(min(object_size, max(4 * len(prefix), position + 4096)))
        if rows == 0:
            raise HeaderError("no pixel data: not an image object")
        raise HeaderError("unreadable DICOM: the Pixel Data element could not be located")
    if not transfer_syntax:
        raise HeaderError("no Transfer Syntax UID in the file meta information")
    uid = UID(transfer_syntax)
    big_endian = transfer_syntax == "1.2.840.10008.1.2.2"
    implicit = transfer_syntax == "1.2.840.10008.1.2"
    encapsulated = transfer_syntax not in NATIVE_SYNTAXES
    if encapsulated and not uid.is_compressed:
        raise HeaderError(f"unsupported transfer syntax {transfer_syntax}")
    value_offset, length = _pixel_element(prefix, position, implicit, big_endian)

    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    bits_allocated = int(dataset.get("BitsAllocated", 0) or 0)
    if samples != 1:
        raise HeaderError(f"{samples} samples per pixel ({dataset.get('PhotometricInterpretation')}); "
                          "expected a greyscale image with 1 sample per pixel")
    if bits_allocated not in (8, 16, 32):
        raise HeaderError(f"BitsAllocated is {bits_allocated}; expected 8, 16 or 32")
    if rows <= 0 or int(dataset.get("Columns", 0) or 0) <= 0:
        raise HeaderError("Rows or Columns missing or zero")
    positions, orientation, spacing, thickness = _frame_geometry(dataset, frames)
    slope, intercept = _rescale(dataset)
    if not positions or orientation is None or spacing is None:
        raise HeaderError("no image geometry (ImagePositionPatient, ImageOrientationPatient and "
                          "PixelSpacing are needed to place slices)")
    header_fields = dict(
        transfer_syntax=transfer_syntax,
        rows=rows,
        columns=int(dataset.Columns),
        frames=frames,
        bits_allocated=bits_allocated,
        bits_stored=int(dataset.get("BitsStored", bits_allocated) or bits_allocated),
        pixel_signed=int(dataset.get("PixelRepresentation", 0) or 0) == 1,
        samples_per_pixel=samples,
        photometric=str(dataset.get("PhotometricInterpretation", "MONOCHROME2")),
        big_endian=big_endian,
        encapsulated=encapsulated,
        rescale_slope=slope,
        rescale_intercept=intercept,
        positions=positions,
        orientation=orientation,
        pixel_spacing=spacing,
        slice_thickness=thickness,
        series_uid=str(dataset.get("SeriesInstanceUID", "")),
        sop_uid=str(dataset.get("SOPInstanceUID", "")),
        modality=str(dataset.get("Modality", "")),
        patient_hash=_patient_hash(dataset),
        pixel_offset=value_offset,
        pixel_length=length,
    )
    if encapsulated:
        header_fields["frame_starts"] = _frame_starts(dataset, prefix, value_offset, frames, object_size)
    header = ObjectHeader(**header_fields)
    needed = header.frame_bytes * frames
    if not encapsulated and (length < needed or value_offset + needed > object_size):
        raise HeaderError(f"Pixel Data holds {length} bytes; {frames} frame(s) of "
                          f"{header.rows}x{header.columns}x{bits_allocated} bits need {needed} "
                          "(truncated object?)")
    return header
