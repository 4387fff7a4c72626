"""DICOM: the only package that imports pydicom.

``header`` parses an object's header from the first bytes of the object and locates its pixel
data; ``pixels`` turns fetched pixel bytes into arrays; ``writer`` encodes volumes as DICOM.
"""

from brainseg.dicom.header import (
    HeaderError,
    NeedMoreBytes,
    ObjectHeader,
    parse_header,
)
from brainseg.dicom.pixels import decode_frame, decode_native_rows, item_fragments

__all__ = [
    "HeaderError",
    "NeedMoreBytes",
    "ObjectHeader",
    "decode_frame",
    "decode_native_rows",
    "item_fragments",
    "parse_header",
]
