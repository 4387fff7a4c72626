"""Where the pixel data lies in an object's bytes: the declared transfer syntax checked against how
the data set is written, the Pixel Data element's value offset and length, the frame offsets of
encapsulated data, and (for an exclusion reason) which element runs past a byte limit.
"""

from __future__ import annotations

import struct

import pydicom.datadict
from pydicom.uid import UID

from brainseg.dicom.elements import element_name, element_value
from brainseg.dicom.errors import HeaderError, NeedMoreBytes

PIXEL_DATA_TAG = (0x7FE0, 0x0010)
ITEM_TAG = (0xFFFE, 0xE000)
NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still found in archives)
}
PIXEL_VRS = (b"OB", b"OW", b"OF", b"OD", b"UN")
PREAMBLE_BYTES = 132  # 128-byte preamble and "DICM"


def pixel_element(prefix: bytes, position: int, implicit: bool, big_endian: bool) -> tuple[int, int]:
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


def frame_starts(dataset, prefix: bytes, value_offset: int, frames: int, object_size: int) -> tuple:
    """Frame offsets from the Extended or Basic Offset Table (always little endian), checked to lie
    inside the object in increasing order."""
    if value_offset + 8 > len(prefix):
        raise NeedMoreBytes(min(object_size, value_offset + 8))
    group, element, table_length = struct.unpack_from("<HHI", prefix, value_offset)
    if (group, element) != ITEM_TAG:
        raise HeaderError("encapsulated Pixel Data does not start with a Basic Offset Table item")
    first_fragment = value_offset + 8 + table_length
    extended = element_value(dataset, "ExtendedOffsetTable")
    if extended is not None:
        if len(extended) % 8:
            raise HeaderError(f"{element_name('ExtendedOffsetTable')} is not a list of 8-byte offsets")
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


def found_encoding(prefix: bytes) -> tuple[bool, bool] | None:
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


def declared_syntax(prefix: bytes) -> str:
    """The Transfer Syntax UID the file meta declares, read from its bytes (always explicit VR little
    endian), or "" when it cannot be found: for a reason when the data set itself cannot be read."""
    return file_meta_uid(prefix, 0x0010)


def declared_class(prefix: bytes) -> str:
    """The Media Storage SOP Class UID the file meta declares (read as :func:`declared_syntax`), or ""."""
    return file_meta_uid(prefix, 0x0002)


def file_meta_uid(prefix: bytes, wanted: int) -> str:
    """The UID of file meta element (0002,``wanted``), read from the prefix's bytes, or "" when absent."""
    position = PREAMBLE_BYTES
    try:
        while position + 8 <= len(prefix):
            group, element = struct.unpack_from("<HH", prefix, position)
            if group != 2:
                return ""
            if prefix[position + 4:position + 6] in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
                (length,) = struct.unpack_from("<I", prefix, position + 8)
                header = 12
            else:
                (length,) = struct.unpack_from("<H", prefix, position + 6)
                header = 8
            if element == wanted:
                return prefix[position + header:position + header + length].decode("ascii").strip("\0 ")
            position += header + length
    except (struct.error, UnicodeDecodeError):
        return ""
    return ""


def encoding_mismatch(declared: str, prefix: bytes) -> str:
    """Why a data set is not written as its declared transfer syntax says, or "" when it is (or
    cannot be told: no file meta group length to find the data set by)."""
    found = found_encoding(prefix)
    uid = UID(declared)
    if found is None or not uid.is_transfer_syntax or found == (uid.is_implicit_VR, uid.is_little_endian):
        return ""
    implicit, little = found
    found = f"{'Implicit' if implicit else 'Explicit'} VR {'Little' if little else 'Big'} Endian"
    return (f"the file meta declares {uid.name} but the data set is encoded as {found}; write the object again "
            "with its true transfer syntax")


def transfer_syntax(dataset, prefix: bytes) -> UID:
    """The declared transfer syntax, checked to be one and to match how the data set is encoded."""
    value = element_value(dataset.file_meta, "TransferSyntaxUID")
    if not value:
        raise HeaderError("no Transfer Syntax UID in the file meta information")
    uid = UID(str(value))
    if not uid.is_transfer_syntax:
        what = f"a {uid.name} UID" if uid.name != str(uid) else "an unregistered UID"
        raise HeaderError(f"TransferSyntaxUID (0002,0010) holds {what}, not a transfer syntax")
    if str(uid) not in NATIVE_SYNTAXES and not uid.is_compressed:
        raise HeaderError(f"unsupported transfer syntax {uid} ({uid.name}): pixel data cannot be located by byte "
                          "ranges; re-encode the object")
    mismatch = encoding_mismatch(str(uid), prefix)
    if mismatch:
        raise HeaderError(mismatch)
    return uid


def element_beyond(prefix: bytes, limit: int, undefined: bool = True) -> str:
    """Which top-level element of the data set runs past byte ``limit`` (for a reason, never a value).

    Walks the elements after the file meta (explicit or implicit VR, little endian, as most
    objects are) until one ends beyond ``limit``; returns its tag and declared size, or "". An
    element of undefined length (a sequence, as a rule) is named only when ``undefined``; else the
    walk stops there without an answer.
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
                return f"element {name} has undefined length and runs past byte {limit}" if undefined else ""
            if position + header + length > limit:
                return f"element {name} declares {length:,} bytes"
            position += header + length
    except (struct.error, IndexError):
        return ""
    return ""
