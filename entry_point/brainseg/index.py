"""The header index: every object's parsed header (or why it has none) and each case's summary.

Headers are parsed from small ranged reads, growing the range until the pixel data is located.
The index is saved as JSON Lines keyed by object key and ETag, and streamed in both directions,
so a dataset of any size never sits in memory as one document.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field

from brainseg import s3io
from brainseg.dicom import HeaderError, NeedMoreBytes, ObjectHeader, parse_header
from brainseg.quality import IndexedObject
from brainseg.summary import CaseSummary

logger = logging.getLogger(__name__)

INDEX_VERSION = 2
HEADER_PREFIX_BYTES = 8 * 1024  # 8 KiB: a classic slice header fits; enhanced objects grow it


def read_header(bucket: str, info: s3io.ObjectInfo) -> IndexedObject:
    """Parse one object's header with as few ranged bytes as possible."""
    if info.size == 0:
        return IndexedObject(info.key, info.size, info.etag, None, "empty object (0 bytes)")
    size = min(HEADER_PREFIX_BYTES, info.size)
    prefix = b""
    while True:
        if size > len(prefix):
            prefix += s3io.get_range(bucket, info.key, len(prefix), size, info.etag)
        try:
            return IndexedObject(info.key, info.size, info.etag, parse_header(prefix, info.size))
        except NeedMoreBytes as more:
            size = min(info.size, max(more.size, len(prefix) + 1))
        except HeaderError as err:
            return IndexedObject(info.key, info.size, info.etag, None, str(err))


@dataclass
class HeaderIndex:
    """What a job saves for the next: every object's header (or error) and each case's summary.

    Stored as JSON Lines: a version line, one line per object, one per case.
    """

    objects: dict[str, IndexedObject] = field(default_factory=dict)
    cases: dict[str, tuple[str, CaseSummary]] = field(default_factory=dict)  # id -> (fingerprint, summary)

    def lines(self):
        yield json.dumps({"version": INDEX_VERSION})
        for obj in self.objects.values():
            yield json.dumps({"object": obj.key, "etag": obj.etag, "size": obj.size, "error": obj.error,
                              "header": obj.header.to_row() if obj.header else None}, separators=(",", ":"))
        for case_id, (fingerprint, summary) in self.cases.items():
            yield json.dumps({"case": case_id, "fingerprint": fingerprint, "summary": asdict(summary)},
                             separators=(",", ":"))


def load_index(index_uri: str) -> HeaderIndex:
    index = HeaderIndex()
    try:
        lines = s3io.read_lines(index_uri)
        if lines is None:
            return index
        if json.loads(next(lines, b"{}")).get("version") != INDEX_VERSION:
            logger.info("header index at %s has another version; indexing from scratch", index_uri)
            return index
        for line in lines:
            entry = json.loads(line)
            if "object" in entry:
                header = ObjectHeader.from_row(entry["header"]) if entry["header"] else None
                index.objects[entry["object"]] = IndexedObject(entry["object"], entry["size"], entry["etag"],
                                                               header, entry["error"])
            else:
                index.cases[entry["case"]] = (entry["fingerprint"], CaseSummary.from_json(entry["summary"]))
    except (s3io.S3Error, ValueError, KeyError, TypeError) as err:
        logger.warning("could not use the header index at %s (%s); indexing from scratch", index_uri, err)
        return HeaderIndex()
    return index


def save_index(index_uri: str, index: HeaderIndex) -> None:
    try:
        s3io.write_lines(index_uri, index.lines())
    except s3io.S3Error as err:
        logger.warning("could not save the header index to %s (%s); the next job will read the "
                       "headers again. Pass a writable index location to keep it.", index_uri, err)
