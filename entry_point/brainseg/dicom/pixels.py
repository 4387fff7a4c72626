"""Turn fetched pixel bytes into arrays.

Native pixel data arrives as a band of rows (one ranged read); encapsulated pixel data arrives
as the items of whole frames and is decoded with pydicom's decoder plugins.
"""

from __future__ import annotations

import struct

import numpy as np
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import get_decoder

from brainseg.dicom.header import ObjectHeader
from brainseg.dicom.pixel_location import ITEM_TAG

SEQUENCE_DELIMITER_TAG = (0xFFFE, 0xE0DD)


class PixelDataError(ValueError):
    """Fetched pixel bytes cannot be turned into an image (a damaged frame or item)."""


def native_dtype(header: ObjectHeader) -> np.dtype:
    """The stored-value dtype of a native object (size, sign, byte order)."""
    kind = "i" if header.pixel_signed else "u"
    order = ">" if header.big_endian else "<"
    return np.dtype(f"{order}{kind}{header.bytes_per_pixel}")


def stored_values(values: np.ndarray, header: ObjectHeader) -> np.ndarray:
    """Keep only BitsStored bits (sign-extended when signed), as pydicom does."""
    if header.bits_stored >= header.bits_allocated:
        return values
    unused = header.bits_allocated - header.bits_stored
    if header.pixel_signed:
        return (values << unused) >> unused
    return values & ((1 << header.bits_stored) - 1)


def to_modality(values: np.ndarray, header: ObjectHeader) -> np.ndarray:
    """Stored values to float32 modality units (Rescale Slope and Intercept applied)."""
    out = stored_values(values, header).astype(np.float32)
    if header.rescale_slope != 1.0:
        out *= np.float32(header.rescale_slope)
    if header.rescale_intercept != 0.0:
        out += np.float32(header.rescale_intercept)
    return out


def decode_native_rows(raw: bytes | memoryview, header: ObjectHeader, rows: int) -> np.ndarray:
    """A ``(rows, columns)`` float32 band from the raw bytes of consecutive native rows."""
    values = np.frombuffer(raw, dtype=native_dtype(header), count=rows * header.columns)
    return to_modality(values.reshape(rows, header.columns), header)


def item_fragments(data: bytes | memoryview) -> list[bytes]:
    """The fragments of consecutive encapsulated items, up to a delimiter or the data's end."""
    fragments = []
    position = 0
    while position + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, position)
        if (group, element) == SEQUENCE_DELIMITER_TAG:
            break
        if (group, element) != ITEM_TAG or position + 8 + length > len(data):
            raise PixelDataError(f"corrupt encapsulated pixel data at byte {position} of the frame")
        fragments.append(bytes(data[position + 8:position + 8 + length]))
        position += 8 + length
    return fragments


def decode_frame(fragments: list[bytes], header: ObjectHeader) -> np.ndarray:
    """Decode one compressed frame (its fragments) into a ``(rows, columns)`` float32 array.

    Raises:
        PixelDataError: the codestream cannot be decoded into ``rows x columns`` pixels.
    """
    try:
        decoder = get_decoder(header.transfer_syntax)
        values, _ = decoder.as_array(
            encapsulate([b"".join(fragments)]),
            rows=header.rows,
            columns=header.columns,
            samples_per_pixel=1,
            bits_allocated=header.bits_allocated,
            bits_stored=header.bits_stored,
            pixel_representation=int(header.pixel_signed),
            photometric_interpretation=header.photometric,
            number_of_frames=1,
        )
        values = values.reshape(header.rows, header.columns)
    except Exception as err:  # each decoder plugin raises its own types on a damaged codestream
        raise PixelDataError(f"a compressed frame cannot be decoded ({type(err).__name__})") from None
    return to_modality(values, header)


def split_frames(pixel_value: bytes | memoryview, frames: int) -> list[bytes]:
    """Frames of encapsulated Pixel Data that has no offset table (starts at its first item)."""
    try:
        return list(generate_frames(bytes(pixel_value), number_of_frames=frames))
    except Exception as err:  # pydicom raises several types on damaged items
        raise PixelDataError(f"encapsulated frames cannot be split ({type(err).__name__})") from None
