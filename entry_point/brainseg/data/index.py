"""The header index: every object's parsed header (or why it has none) and each case's summary.

Headers are parsed from small ranged reads, growing the range until the pixel data is located,
never past ``max_header_bytes``. The index is saved as JSON Lines keyed by object key and ETag,
and streamed in both directions, so a dataset of any size never sits in memory as one document.

Identifiers never enter the index: PatientID and the series and instance UIDs are kept as keyed
hashes (HMAC-SHA256). The key is a per-dataset secret, found by ``identity_key_uri``: ``s3://…``
(32 random bytes created there once with a conditional PUT: a bucket or prefix with its own
grants), ``env:NAME`` (hex in that environment variable); or, without one, ``BRAINSEG_IDENTITY_KEY``
(hex) when set, else ``<index>.key`` beside the index. Without the key a hash cannot be checked
against guessed medical record numbers.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from brainseg.data.quality import IndexedObject
from brainseg.data.registration import Registration
from brainseg.data.summary import CaseSummary, Points
from brainseg.dicom import (
    SEGMENTATION_STORAGE,
    HeaderError,
    NeedMoreBytes,
    NotAnImage,
    NotDicom,
    ObjectHeader,
    declared_class,
    element_beyond,
    parse_header,
)
from brainseg.io import s3

logger = logging.getLogger(__name__)

INDEX_VERSION = 6  # 3: keyed identity hashes, stray objects; 4: per-sequence intensities, label counts;
# 5: frames of reference, studies and how each series was acquired; 6: the series' day
HEADER_PREFIX_BYTES = 8 * 1024  # 8 KiB: a classic slice header fits; enhanced objects grow it
MAX_HEADER_BYTES = 1024 * 1024  # 1 MiB: a header larger than this is refused, never downloaded
# A segmentation's header grows with its frames (a functional-group item each): its own, larger bound.
MAX_SEGMENTATION_HEADER_BYTES = 64 * 1024 * 1024
KEY_BYTES = 32
KEY_ENVIRONMENT = "BRAINSEG_IDENTITY_KEY"
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")  # a file named like this is meant to be a slice


class IndexLocationError(ValueError):
    """The index location holds an object that is not a header index (it would be overwritten)."""


def is_stray_name(key: str) -> str:
    """Why an object is skipped by its name alone ("" when it is not): hidden files and DICOMDIR."""
    name = key.rsplit("/", 1)[-1]
    if name.startswith("."):
        return "hidden file (e.g. .DS_Store), not part of a series"
    if name.upper() == "DICOMDIR":
        return "DICOMDIR (a media directory), not part of a series"
    return ""


def parse_object(key: str, size: int, fetch: Callable[[int, int], bytes], identity_key: bytes = b"",
                 max_header_bytes: int = MAX_HEADER_BYTES) -> tuple[ObjectHeader | None, str, bool]:
    """Parse one object's header from as few leading bytes as possible (at most ``max_header_bytes``;
    a segmentation's at most :data:`MAX_SEGMENTATION_HEADER_BYTES`; a structure set is told apart by
    its file meta, without reading the rest).

    Args:
        key: the object's key (its name decides whether a non-DICOM object is stray).
        size: the object's size in bytes.
        fetch: ``fetch(start, stop)`` returns the object's bytes ``[start, stop)``.

    Returns:
        ``(header, error, stray)``: the header, or ``None`` with the reason. An object that is not
        an image (a text file, a DICOM report) is ``stray``: a folder may hold it beside its
        slices. A damaged image object is not stray: its series cannot be trusted.
    """
    looks_like_a_slice = key.lower().endswith(DICOM_SUFFIXES)
    if size == 0:
        return None, "empty object (0 bytes)", not looks_like_a_slice
    wanted = min(HEADER_PREFIX_BYTES, size, max_header_bytes)
    prefix = b""
    while True:
        if wanted > len(prefix):
            prefix += fetch(len(prefix), wanted)
        try:
            return parse_header(prefix, size, identity_key), "", False
        except NeedMoreBytes as more:
            if len(prefix) >= max_header_bytes and declared_class(prefix) == SEGMENTATION_STORAGE:
                max_header_bytes = max(max_header_bytes, MAX_SEGMENTATION_HEADER_BYTES)  # asked only at the bound
            if len(prefix) >= max_header_bytes:
                beyond = element_beyond(prefix, max_header_bytes)
                return None, (f"the header does not end within {max_header_bytes:,} bytes"
                              f"{' (' + beyond + ')' if beyond else ''}; larger headers are not read (raise "
                              "--max-header-mb and re-index with --refresh-index if it is genuine)"), False
            wanted = min(size, max(more.size, len(prefix) + 1), max_header_bytes)
        except NotDicom as err:
            return None, str(err), not looks_like_a_slice
        except NotAnImage as err:
            return None, str(err), True
        except HeaderError as err:
            return None, str(err), False
        except Exception as err:  # last line of defence: hostile bytes must not stop indexing
            return None, f"unexpected error while parsing the header ({type(err).__name__})", False


def read_header(bucket: str, info: s3.ObjectInfo, identity_key: bytes = b"",
                max_header_bytes: int = MAX_HEADER_BYTES) -> IndexedObject:
    """:func:`parse_object` by ranged GETs (pinned to the listed ETag)."""
    header, error, stray = parse_object(
        info.key, info.size, lambda start, stop: s3.get_range(bucket, info.key, start, stop, info.etag),
        identity_key, max_header_bytes)
    return IndexedObject(info.key, info.size, info.etag, header, error, stray)


def without_descriptions(obj: IndexedObject) -> IndexedObject:
    """``obj`` with its header's free text (SeriesDescription, ProtocolName, SequenceName) and date
    left out: only the studies layout needs them, and text may hold a name, a date identifies a visit."""
    header = obj.header
    if header is None or not (header.description or header.protocol or header.sequence_name or header.series_day):
        return obj
    return replace(obj, header=replace(header, description="", protocol="", sequence_name="", series_day=0))


def _key_from_environment(name: str, required: bool) -> bytes | None:
    text = os.environ.get(name, "").strip()
    if not text:
        if required:
            raise ValueError(f"identity_key_uri env:{name}: the environment variable {name} is not set; set it to the "
                             "key in hex (e.g. `openssl rand -hex 32`) from your secret store")
        return None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise ValueError(f"{name} must be at least 16 bytes written as hex (e.g. `openssl rand -hex 32`)")
    return key


def identity_key(index_uri: str, key_uri: str = "") -> bytes:
    """The dataset's identity key: at ``key_uri`` (``s3://…``, created there once, or ``env:NAME``);
    without one, from ``BRAINSEG_IDENTITY_KEY``, else beside the index (created once).

    Raises:
        ValueError: the environment's key is missing or malformed, or the stored key is damaged.
    """
    if key_uri.startswith("env:"):
        return _key_from_environment(key_uri[4:], required=True)
    key = None if key_uri else _key_from_environment(KEY_ENVIRONMENT, required=False)
    if key is not None:
        return key
    uri = key_uri or index_uri + ".key"
    fresh = secrets.token_bytes(KEY_BYTES)
    try:
        stored = s3.read_uri(uri)
        if stored is None:
            try:
                s3.put_bytes(uri, fresh, if_none_match=True)
                return fresh
            except s3.Conflict:
                stored = s3.read_uri(uri)  # another job created it first
    except s3.S3Error as err:
        if key_uri:
            raise ValueError(f"identity_key_uri {key_uri}: the key cannot be read or created ({err}); grant the job "
                             "s3:GetObject and s3:PutObject on it") from None
        logger.warning("could not read or store the identity key at %s (%s): this job's identity hashes are its "
                       "own, and no saved index can be reused", uri, err)
        return fresh
    if stored is None or len(stored) != KEY_BYTES:
        raise ValueError(f"the identity key {uri} is damaged ({0 if stored is None else len(stored)} bytes, expected "
                         f"{KEY_BYTES}); delete it and the index beside it, then index again")
    return stored


def key_id(key: bytes) -> str:
    """Names a key without revealing it, so an index hashed with another key is not reused."""
    return hmac.new(key, b"brainseg identity key", "sha256").hexdigest()[:12]


@dataclass
class HeaderIndex:
    """What a job saves for the next: every object's header (or error) and each case's summary.

    Stored as JSON Lines: a version line (with the identity key's ID), one line per object, one per
    case, one per registration (:func:`brainseg.data.registration.pair_name`).
    """

    key_id: str = ""
    objects: dict[str, IndexedObject] = field(default_factory=dict)
    cases: dict[str, tuple[str, CaseSummary]] = field(default_factory=dict)  # id -> (fingerprint, summary)
    descriptions: bool = False  # the headers keep their series descriptions (the studies layout needs them)
    registrations: dict[str, Registration] = field(default_factory=dict)  # pair name -> fitted transform

    def lines(self):
        yield json.dumps({"version": INDEX_VERSION, "key_id": self.key_id, "descriptions": self.descriptions})
        for obj in self.objects.values():
            yield json.dumps({"object": obj.key, "etag": obj.etag, "size": obj.size, "error": obj.error,
                              "stray": obj.stray, "header": obj.header.to_row() if obj.header else None},
                             separators=(",", ":"))
        for case_id, (fingerprint, summary) in self.cases.items():
            yield json.dumps({"case": case_id, "fingerprint": fingerprint, "summary": asdict(summary)},
                             separators=(",", ":"), default=Points.tolist)
        for name, registration in self.registrations.items():
            yield json.dumps({"registration": name, **registration.to_row()}, separators=(",", ":"))


def _version_line(index_uri: str, lines) -> dict:
    """The first line of the object at the index location, which must be an index's version line."""
    refusal = (f"index location {index_uri} holds an object that is not a brainseg header index; it would be "
               "overwritten. Pass another --index-uri (or remove that object)")
    try:
        first = json.loads(next(lines, b""))
    except ValueError:
        raise IndexLocationError(refusal) from None
    if not isinstance(first, dict) or not isinstance(first.get("version"), int):
        raise IndexLocationError(refusal)
    return first


def load_index(index_uri: str, current_key_id: str, refresh: bool = False) -> HeaderIndex:
    """The saved index, or an empty one when there is none, it is of another version or key, it
    cannot be read, or ``refresh`` asks to read every header again.

    Raises:
        IndexLocationError: something that is not an index is stored at ``index_uri``.
    """
    index = HeaderIndex(current_key_id)
    try:
        lines = s3.read_lines(index_uri)
        if lines is None:
            return index
        first = _version_line(index_uri, lines)
        if refresh:
            return index
        if (first["version"], first.get("key_id")) != (INDEX_VERSION, current_key_id):
            logger.info("header index at %s has another version or identity key; indexing from scratch", index_uri)
            return index
        index.descriptions = bool(first.get("descriptions"))
        for line in lines:
            entry = json.loads(line)
            if "object" in entry:
                header = ObjectHeader.from_row(entry["header"]) if entry["header"] else None
                index.objects[entry["object"]] = IndexedObject(entry["object"], entry["size"], entry["etag"],
                                                               header, entry["error"], entry["stray"])
            elif "registration" in entry:
                index.registrations[entry["registration"]] = Registration.from_row(entry)
            else:
                index.cases[entry["case"]] = (entry["fingerprint"], CaseSummary.from_json(entry["summary"]))
    except IndexLocationError:
        raise
    except (s3.S3Error, ValueError, KeyError, TypeError) as err:
        logger.warning("could not use the header index at %s (%s); indexing from scratch", index_uri, err)
        return HeaderIndex(current_key_id)
    return index


def save_index(index_uri: str, index: HeaderIndex) -> None:
    try:
        s3.write_lines(index_uri, index.lines())
    except s3.S3Error as err:
        logger.warning("could not save the header index to %s (%s); the next job will read the "
                       "headers again. Pass a writable index location to keep it.", index_uri, err)
