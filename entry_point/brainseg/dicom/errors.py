"""The errors of reading a DICOM header; every message names an element, never its value."""

from __future__ import annotations


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
