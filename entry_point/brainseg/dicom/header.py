"""Parse a DICOM object's header from its first bytes and locate its pixel data.

The caller fetches a prefix of the object with a ranged read and calls :func:`parse_header`.
When the prefix ends before the Pixel Data element (or before the Basic Offset Table of
encapsulated data), :class:`NeedMoreBytes` says how many bytes to fetch instead.

Any byte may be wrong. Every failure becomes a :class:`HeaderError` whose message names the
element and what was expected, never a value read from the file: header values may identify a
patient. :class:`NotDicom` and :class:`NotAnImage` mark objects that are not images at all (a text
file, a DICOMDIR, a structured report), which a series may hold beside its slices. The result,
:class:`ObjectHeader`, holds technical fields and how the series was acquired (its description
among them, to tell sequences apart; never logged); identifiers (patient ID, study, series, instance
and frame-of-reference UIDs) are kept only as keyed hashes, for grouping and comparing.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import re
from dataclasses import dataclass, fields

import pydicom
from pydicom.uid import UID

from brainseg.dicom.elements import (
    acquisition_fields,
    describe,
    element_value,
    frame_geometry,
    integer,
    rescale,
    segmentation_frames,
)
from brainseg.dicom.errors import HeaderError, NeedMoreBytes, NotAnImage, NotDicom
from brainseg.dicom.pixel_location import (
    ITEM_TAG,
    NATIVE_SYNTAXES,
    PREAMBLE_BYTES,
    declared_class,
    declared_syntax,
    element_beyond,
    encoding_mismatch,
    frame_starts,
    pixel_element,
    transfer_syntax,
)

__all__ = ["ITEM_TAG", "NATIVE_SYNTAXES", "HeaderError", "NeedMoreBytes", "NotAnImage", "NotDicom", "ObjectHeader",
           "element_beyond", "identity_hash", "parse_header"]

IMAGE_CLASSES_WITHOUT_IMAGE_IN_NAME = {"Segmentation Storage", "Parametric Map Storage"}
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
IDENTITY_DIGITS = 16  # hex digits kept of each keyed hash


@dataclass(frozen=True, slots=True)
class ObjectHeader:
    """What a region read needs to know about one DICOM object.

    Offsets are absolute byte positions in the object. For native (uncompressed) syntaxes,
    ``pixel_offset`` is the first pixel byte and frames follow each other. For encapsulated
    syntaxes, ``frame_starts`` holds the offset of each frame's first item when the Basic (or
    Extended) Offset Table gives it, else it is empty. ``series_hash``, ``instance_hash`` and
    ``patient_hash`` are keyed hashes of SeriesInstanceUID, SOPInstanceUID and PatientID,
    ``frame_hash`` of FrameOfReferenceUID.
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
    frame_hash: str = ""  # keyed hash of FrameOfReferenceUID: series that share it share patient coordinates
    # How the series was acquired (elements.acquisition_fields), to tell sequences apart. SeriesDescription,
    # ProtocolName and SequenceName are free text a technologist typed (it may hold a name): never logged,
    # and kept in the saved index only for the studies layout, which reads them (data.index.without_descriptions).
    study_hash: str = ""  # keyed hash of StudyInstanceUID
    series_number: int = 0
    series_time: float = -1.0  # SeriesTime, seconds since midnight (-1: none)
    series_day: int = 0  # SeriesDate (else AcquisitionDate, StudyDate) as a date ordinal (0: none); a date of
    # service: never logged, kept in the saved index only for the studies layout (as the free text above)
    description: str = ""
    protocol: str = ""
    sequence_name: str = ""
    scanning_sequence: str = ""
    sequence_variant: str = ""
    acquisition_type: str = ""  # MRAcquisitionType: 2D or 3D
    repetition_time: float = 0.0  # ms; 0: not given
    echo_time: float = 0.0
    inversion_time: float = 0.0
    contrast_agent: str = ""
    image_type: str = ""  # ImageType's values joined by backslashes, e.g. ORIGINAL\PRIMARY\M\ND

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

    @property
    def padding_bytes(self) -> int:
        """Native Pixel Data declared beyond what the frames need: trailing padding (one byte evens an
        odd length; more is accepted up to a frame), never read."""
        return max(0, self.pixel_length - self.pixel_bytes) if not self.encapsulated else 0

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
                  "modality", "patient_hash", "frame_hash", "rescale_slope", "rescale_intercept", "slice_thickness",
                  "study_hash", "series_number", "series_day", "series_time", "description", "protocol", "sequence_name",
                  "scanning_sequence", "sequence_variant", "acquisition_type", "repetition_time", "echo_time",
                  "inversion_time", "contrast_agent", "image_type")
_shared: dict = {}


def identity_hash(key: bytes, value: str) -> str:
    """A keyed hash (HMAC-SHA256) of an identifier: equal identifiers give equal hashes, and
    without the key a guess cannot be checked against it."""
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:IDENTITY_DIGITS]


def _sop_class_name(dataset) -> str:
    uid = element_value(dataset.file_meta, "MediaStorageSOPClassUID") or element_value(dataset, "SOPClassUID")
    name = UID(str(uid)).name if uid else ""
    return name if name and name != str(uid) else ""  # a registered class, never an arbitrary UID's text


def not_an_image_reason(sop_class: str) -> str:
    """Why an object of the registered class ``sop_class`` (its name) is not read as an image."""
    return f"no pixel data: a {sop_class} object"


def _carries_pixels(sop_class: str, dataset) -> bool:
    return ("Image Storage" in sop_class or sop_class in IMAGE_CLASSES_WITHOUT_IMAGE_IN_NAME
            or element_value(dataset, "Rows") is not None)


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
    dataset, position = _data_set(prefix, object_size)
    uid = transfer_syntax(dataset, prefix)
    encapsulated = str(uid) not in NATIVE_SYNTAXES
    value_offset, length = pixel_element(prefix, position, uid.is_implicit_VR, not uid.is_little_endian)
    header_fields = _image_fields(dataset, encapsulated)
    positions, orientation, spacing, thickness = frame_geometry(dataset, header_fields["frames"])
    slope, intercept = rescale(dataset, header_fields["bits_stored"], header_fields["pixel_signed"])
    header_fields.update(
        transfer_syntax=str(uid),
        big_endian=not uid.is_little_endian,
        encapsulated=encapsulated,
        rescale_slope=slope,
        rescale_intercept=intercept,
        positions=positions,
        orientation=orientation,
        pixel_spacing=spacing,
        slice_thickness=thickness,
        series_hash=_hashed(identity_key, element_value(dataset, "SeriesInstanceUID")),
        instance_hash=_hashed(identity_key, element_value(dataset, "SOPInstanceUID")),
        modality=re.sub(r"[^A-Z0-9]", "", str(element_value(dataset, "Modality") or ""))[:16],
        patient_hash=_hashed(identity_key, element_value(dataset, "PatientID")),
        frame_hash=_hashed(identity_key, element_value(dataset, "FrameOfReferenceUID")),
        study_hash=_hashed(identity_key, element_value(dataset, "StudyInstanceUID")),
        **acquisition_fields(dataset),
        pixel_offset=value_offset,
        pixel_length=length,
    )
    if encapsulated:
        if length != -1:
            raise HeaderError("encapsulated Pixel Data must have undefined length")
        header_fields["frame_starts"] = frame_starts(dataset, prefix, value_offset, header_fields["frames"],
                                                     object_size)
    header = ObjectHeader(**header_fields)
    if not encapsulated:
        _check_native_length(header, object_size)
    return header


def _data_set(prefix: bytes, object_size: int):
    """The data set before Pixel Data and the byte offset of the Pixel Data element.

    Raises:
        NeedMoreBytes, NotDicom, NotAnImage, HeaderError: as :func:`parse_header`.
    """
    complete = len(prefix) >= object_size
    if not complete and len(prefix) < PREAMBLE_BYTES:
        raise NeedMoreBytes(min(object_size, 4096))
    if prefix[128:132] != b"DICM":
        raise NotDicom("not a DICOM file (no 'DICM' marker after the 128-byte preamble)")
    if declared_class(prefix) == STRUCTURE_SET_STORAGE:  # all header, no pixels: told by its first bytes
        raise NotAnImage(not_an_image_reason("RT Structure Set Storage"))
    stream = io.BytesIO(prefix)
    try:
        dataset = pydicom.dcmread(stream, stop_before_pixels=True)
        position = stream.tell()
    except Exception as err:  # pydicom raises many types on truncated or corrupt input
        if not complete:
            raise NeedMoreBytes(min(object_size, 4 * len(prefix))) from None
        raise HeaderError(_unreadable(prefix, object_size) or
                          f"the header cannot be parsed (near byte {stream.tell()}: {describe(err)})") from None
    found_pixels = position + 12 <= len(prefix) and prefix[position:position + 4] in (b"\xe0\x7f\x10\x00",
                                                                                   b"\x7f\xe0\x00\x10")
    if found_pixels:
        return dataset, position
    if not complete:
        raise NeedMoreBytes(min(object_size, max(4 * len(prefix), position + 4096)))
    sop_class = _sop_class_name(dataset)
    if _carries_pixels(sop_class, dataset):
        raise HeaderError(_unreadable(prefix, object_size) or
                          f"the header ends at byte {position} of {object_size} without Pixel Data, but "
                          f"{'a ' + sop_class if sop_class else 'an image'} object carries pixel data "
                          "(truncated object?)")
    raise NotAnImage(not_an_image_reason(sop_class) if sop_class else
                     "no pixel data and no registered SOP class: taken for a non-image object")


def _unreadable(prefix: bytes, object_size: int) -> str:
    """Why a whole object's data set cannot be read to its Pixel Data, where its bytes say: a
    transfer syntax that misstates the encoding, or an element longer than the object; "" else."""
    mismatch = encoding_mismatch(declared_syntax(prefix), prefix)
    if mismatch:
        return mismatch
    beyond = element_beyond(prefix, object_size, undefined=False)
    return f"{beyond}, past the end of the {object_size:,}-byte object (a wrong length, or a truncated object)" \
        if beyond else ""


def _image_fields(dataset, encapsulated: bool) -> dict:
    """The pixel format (size, bits, sign, photometric) and a segmentation's frames, checked."""
    frames = integer(dataset, "NumberOfFrames", 1)
    samples = integer(dataset, "SamplesPerPixel", 1)
    bits_allocated = integer(dataset, "BitsAllocated", 0)
    bits_stored = integer(dataset, "BitsStored", bits_allocated)
    rows, columns = integer(dataset, "Rows", 0), integer(dataset, "Columns", 0)
    photometric = str(element_value(dataset, "PhotometricInterpretation") or "MONOCHROME2").strip()
    segmentation = str(element_value(dataset.file_meta, "MediaStorageSOPClassUID") or element_value(dataset, "SOPClassUID")
                       or "") == SEGMENTATION_STORAGE
    if samples != 1:
        raise HeaderError(f"{samples} samples per pixel; expected a greyscale image with 1 sample per pixel")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise HeaderError("PhotometricInterpretation is not MONOCHROME1 or MONOCHROME2 (a greyscale image)")
    segments, fractional_max = (segmentation_frames(dataset, frames, bits_allocated, encapsulated) if segmentation
                                else ((), 0))
    if bits_allocated not in ((1, 8) if segmentation else (8, 16, 32)):
        raise HeaderError(f"BitsAllocated is {bits_allocated}; expected 8, 16 or 32")
    if not 1 <= bits_stored <= bits_allocated:
        raise HeaderError(f"BitsStored is {bits_stored}; expected 1 to BitsAllocated ({bits_allocated})")
    if rows <= 0 or columns <= 0:
        raise HeaderError("Rows or Columns missing or zero")
    if frames < 1:
        raise HeaderError(f"NumberOfFrames is {frames}; expected at least 1")
    representation = integer(dataset, "PixelRepresentation", 0)
    if representation not in (0, 1):
        raise HeaderError(f"PixelRepresentation is {representation}; expected 0 (unsigned) or 1 (signed)")
    return dict(rows=rows, columns=columns, frames=frames, bits_allocated=bits_allocated, bits_stored=bits_stored,
                pixel_signed=representation == 1, samples_per_pixel=samples, photometric=photometric,
                segments=segments, fractional_max=fractional_max)


def _check_native_length(header: ObjectHeader, object_size: int) -> None:
    """Uncompressed Pixel Data must declare, and the object must hold, the bytes the frames need."""
    needed, length = header.pixel_bytes, header.pixel_length
    what = (f"{needed} bytes that {header.frames} frame(s) of {header.rows}x{header.columns}x"
            f"{header.bits_allocated} bits need")
    if length == -1:
        raise HeaderError(f"the Pixel Data element has undefined length (the encapsulated form), but "
                          f"{UID(header.transfer_syntax).name} is a native transfer syntax: a defined length of the "
                          f"{what} was expected (a damaged object, or a wrong transfer syntax)")
    if length < needed:
        raise HeaderError(f"the Pixel Data element declares {length} of the {what}")
    if length - needed >= max(header.frame_bytes, 2):  # less than a frame more is trailing padding
        raise HeaderError(f"the Pixel Data element declares {length} bytes, a frame or more beyond the {what}: "
                          "Rows, Columns, BitsAllocated or NumberOfFrames is wrong")
    held = object_size - header.pixel_offset
    if held < needed:
        raise HeaderError(f"Pixel Data holds {max(held, 0)} of the {what} (truncated object?)")


def _hashed(key: bytes, identifier) -> str:
    """The identifier's keyed hash, or "" when it is absent or blank."""
    text = str(identifier or "").strip()
    return identity_hash(key, text) if text else ""


