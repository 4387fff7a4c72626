"""A case from DICOM files held in memory (a hosting request's body): the same header parser,
series checks, region reader and intensity statistics as a case in S3, its byte ranges served from
the files instead of GETs."""

from __future__ import annotations

import dataclasses

from brainseg.data.assembly import assemble_case
from brainseg.data.catalog import Case
from brainseg.data.index import parse_object
from brainseg.data.quality import IndexedObject
from brainseg.data.summary import summarise_case

MEMORY_BUCKET = "in-memory"  # the bucket name the case's series carry (never sent anywhere)


def case_from_files(case_id: str, files: dict[str, bytes], sequences: tuple, zero_fill: bool = False) -> Case:
    """The case whose files are ``{path: bytes}``, each under a folder named after its sequence
    (``t1c/IM_0001.dcm``, or deeper: the last folder counts); a single-sequence model also takes
    files with no folder. Files of other folders are ignored.

    Raises:
        QualityError: a sequence missing, damaged or on another grid (the reason, as for a case in S3).
    """
    def fetch(requests: list) -> list[bytes]:
        return [files[key][start:stop] for _bucket, key, start, stop, *_ in requests]

    parts: dict[str, list[IndexedObject]] = {name: [] for name in (*sequences, "mask")}
    for key, data in sorted(files.items()):
        folder = key.rpartition("/")[0].rpartition("/")[2] or (sequences[0] if len(sequences) == 1 else "")
        if folder in sequences:
            header, error, stray = parse_object(key, len(data), lambda start, stop, data=data: data[start:stop])
            parts[folder].append(IndexedObject(key, len(data), "", header, error, stray))
    images, _ = assemble_case(MEMORY_BUCKET, tuple(sequences), parts, zero_fill, False, [])
    images = {name: dataclasses.replace(series, fetch=fetch) if series is not None else None
              for name, series in images.items()}
    summary = summarise_case(case_id, images, None)
    missing = tuple(name for name, series in images.items() if series is None)
    return Case(case_id, "predict", tuple(images.values()), None, summary, missing=missing)
