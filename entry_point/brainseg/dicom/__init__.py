"""DICOM: the only package that imports pydicom.

``header`` parses an object's header from the first bytes of the object (``elements``: checked
element reads; ``pixel_location``: where the pixel data and its frames lie; ``errors``); ``pixels``
turns fetched pixel bytes into arrays; ``seg`` reads DICOM SEG; ``writer`` encodes volumes as DICOM.

Importing the package silences pydicom's own warnings and log lines: they quote header values
(a damaged UID, a name), and header values may identify a patient. What went wrong is reported
by this package's exceptions instead, which name elements, never their values.
"""

import logging
import warnings

import pydicom.config

from brainseg.dicom.header import (
    SEGMENTATION_STORAGE,
    HeaderError,
    NeedMoreBytes,
    NotAnImage,
    NotDicom,
    ObjectHeader,
    element_beyond,
    identity_hash,
    parse_header,
)
from brainseg.dicom.pixel_location import declared_class
from brainseg.dicom.pixels import PixelDataError, decode_frame, decode_native_rows, item_fragments


def _silence_pydicom() -> None:
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    pydicom_logger = logging.getLogger("pydicom")  # the parent of every pydicom.* logger
    pydicom_logger.addHandler(logging.NullHandler())
    pydicom_logger.propagate = False


_silence_pydicom()

__all__ = [
    "SEGMENTATION_STORAGE",
    "HeaderError",
    "NeedMoreBytes",
    "NotAnImage",
    "NotDicom",
    "ObjectHeader",
    "PixelDataError",
    "declared_class",
    "decode_frame",
    "decode_native_rows",
    "element_beyond",
    "identity_hash",
    "item_fragments",
    "parse_header",
]
