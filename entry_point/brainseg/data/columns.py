"""A series' per-object state held as columns rather than one Python object per DICOM object.

A single-frame series is hundreds of objects, a BraTS-sized dataset about a million, and every
process of a job (each rank, each DataLoader worker) holds the whole catalog. As tuples of Python
strings, ints and :class:`~brainseg.dicom.header.ObjectHeader` instances an object costs about
1 KB; as columns it costs what its varying values need (its key's own characters, its ETag's 16
bytes, its size, pixel offset and position), the values every object of the series shares being
kept once. Each column reads as the tuple it replaces (indexing, iteration, ``len``, equality,
hashing, pickling), so the readers index ``series.keys[obj]`` and ``series.headers[obj]`` as before.
"""

from __future__ import annotations

import operator
import os
import re
from collections.abc import Sequence
from dataclasses import fields, replace

import numpy as np

from brainseg.dicom.header import ObjectHeader

HEX_DIGITS = "0123456789abcdef"
HEX = re.compile(r"(?:[0-9a-f]{2})+")


def _smallest(array: np.ndarray) -> np.ndarray:
    """An int64 array as int32 where its values fit."""
    info = np.iinfo(np.int32)
    return array.astype(np.int32) if not array.size or info.min <= array.min() and array.max() <= info.max else array


class _Column(Sequence):
    """Equality, hashing and slicing as the tuple the column stands for."""

    __slots__ = ()

    def _item(self, index: int):
        raise NotImplementedError

    def __getitem__(self, index):
        if isinstance(index, slice):
            return tuple(self)[index]
        index = operator.index(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"{type(self).__name__} index {index} out of range for {len(self)} item(s)")
        return self._item(index)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)!r})"


class Texts(_Column):
    """Strings kept as their common prefix and suffix once and the rest joined, or, where every rest
    is lower-case hex of one length (ETags, identity hashes), as the bytes that hex spells."""

    __slots__ = ("_prefix", "_suffix", "_body", "_ends", "_width")

    def __init__(self, values=()):
        values = [str(value) for value in values]
        prefix = os.path.commonprefix(values) if values else ""
        suffix = os.path.commonprefix([value[len(prefix):][::-1] for value in values])[::-1] if values else ""
        hex_prefix, hex_suffix = prefix.rstrip(HEX_DIGITS), suffix.lstrip(HEX_DIGITS)
        rests = [value[len(hex_prefix):len(value) - len(hex_suffix)] for value in values]
        if len({len(rest) for rest in rests}) == 1 and rests[0] and all(HEX.fullmatch(rest) for rest in rests):
            self._prefix, self._suffix = hex_prefix, hex_suffix
            self._width, self._ends = len(rests[0]) // 2, None
            self._body = bytes.fromhex("".join(rests))
            return
        self._prefix, self._suffix, self._width = prefix, suffix, 0
        rests = [value[len(prefix):len(value) - len(suffix)] for value in values]
        self._ends = _smallest(np.cumsum([len(rest) for rest in rests], dtype=np.int64))
        self._body = "".join(rests)

    def __len__(self) -> int:
        return len(self._body) // self._width if self._width else len(self._ends)

    def _item(self, index: int) -> str:
        if self._width:
            rest = self._body[index * self._width:(index + 1) * self._width].hex()
        else:
            rest = self._body[int(self._ends[index - 1]) if index else 0:int(self._ends[index])]
        return f"{self._prefix}{rest}{self._suffix}"

    def __reduce__(self):
        return Texts, (tuple(self),)


class Numbers(_Column):
    """Numbers (ints or floats, as given) kept once when they are all equal, else as an array."""

    __slots__ = ("_constant", "_array", "_count", "_kind")

    def __init__(self, values=()):
        values = list(values)
        self._count = len(values)
        self._kind = float if any(isinstance(value, float) for value in values) else int
        self._constant = values[0] if values and all(value == values[0] for value in values) else None
        self._array = None if self._constant is not None or not values else (
            np.asarray(values, dtype=np.float64) if self._kind is float else _smallest(np.asarray(values, np.int64)))

    def __len__(self) -> int:
        return self._count

    def _item(self, index: int):
        return self._constant if self._array is None else self._kind(self._array[index])

    def __reduce__(self):
        return Numbers, (tuple(self),)


class Rows(_Column):
    """Equal-length tuples of numbers (a series' planes as ``(object, frame)``, a multi-frame
    object's frame positions as ``(x, y, z)``) as one array, read back as tuples of Python numbers."""

    __slots__ = ("_array",)

    def __init__(self, rows=(), width: int = 2, dtype=np.int32):
        array = np.array(rows, dtype=dtype).reshape(-1, width)
        array.flags.writeable = False
        self._array = array

    def __len__(self) -> int:
        return len(self._array)

    def _item(self, index: int) -> tuple:
        return tuple(self._array[index].tolist())

    def __reduce__(self):
        return Rows, (self._array, self._array.shape[1], self._array.dtype)


def plane_rows(planes=()) -> Rows:
    """A series' planes ``((object index, frame index), ...)`` as one int32 array."""
    return Rows(planes, 2, np.int32)


def position_rows(positions=()) -> Rows:
    """Frame positions ``((x, y, z), ...)`` in mm as one float64 array."""
    return Rows(positions, 3, np.float64)


_NAMES = tuple(spec.name for spec in fields(ObjectHeader))
# What may differ between the objects of one series without the headers losing their columns.
_VARYING = ("positions", "instance_hash", "pixel_offset", "pixel_length", "rescale_slope", "rescale_intercept",
            "frame_starts")
_FRAME_STARTS_NONE = -1
_INDEX = {name: position for position, name in enumerate(_NAMES)}


class Headers(_Column):
    """The headers of a series of one-frame objects that differ only in their position, instance,
    pixel offset and length, rescale and frame offset: the first header once, those as columns.
    Other headers (multi-frame objects, series whose objects differ in more) stay a tuple of
    headers, their per-frame values as columns."""

    __slots__ = ("_template", "_columns", "_values")

    def __init__(self, template: ObjectHeader, columns: dict):
        self._template, self._columns = template, columns
        self._values = [getattr(template, name) for name in _NAMES]

    @classmethod
    def of(cls, headers: Sequence) -> Sequence:
        """``headers`` as columns where they fit (see the class), else as the tuple they are."""
        headers = tuple(headers)
        if not headers or any(header.frames != 1 or len(header.positions) != 1 or len(header.frame_starts) > 1
                              for header in headers):
            return tuple(map(_framewise, headers))
        template = headers[0]
        shared = [name for name in _NAMES if name not in _VARYING]
        if any(getattr(header, name) != getattr(template, name) for header in headers[1:] for name in shared):
            return tuple(map(_framewise, headers))
        columns = {"positions": position_rows([header.positions[0] for header in headers]),
                   "instance_hash": Texts(header.instance_hash for header in headers),
                   "frame_starts": Numbers(header.frame_starts[0] if header.frame_starts else _FRAME_STARTS_NONE
                                           for header in headers),
                   **{name: Numbers(getattr(header, name) for header in headers)
                      for name in ("pixel_offset", "pixel_length", "rescale_slope", "rescale_intercept")}}
        return cls(template, columns)

    def __len__(self) -> int:
        return len(self._columns["positions"])

    def _item(self, index: int) -> ObjectHeader:
        values = self._values.copy()
        for name, column in self._columns.items():
            values[_INDEX[name]] = column._item(index)
        start = values[_INDEX["frame_starts"]]
        values[_INDEX["frame_starts"]] = () if start == _FRAME_STARTS_NONE else (start,)
        values[_INDEX["positions"]] = (values[_INDEX["positions"]],)  # one frame
        return ObjectHeader(*values)

    def __reduce__(self):
        return Headers, (self._template, self._columns)


def _framewise(header: ObjectHeader) -> ObjectHeader:
    """A header whose per-frame tuples (positions, frame offsets, segment numbers) are columns: a
    multi-frame object's 155 frame positions cost 3.7 KB rather than 21 KB."""
    if header.frames < 2:
        return header
    return replace(header, positions=position_rows(header.positions), frame_starts=Numbers(header.frame_starts),
                   segments=Numbers(header.segments))
