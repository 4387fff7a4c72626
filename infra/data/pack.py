"""Pack a dataset's single-frame series into one multi-frame object per series, in S3, in parallel.

    brainseg-pack s3://bucket/src/ s3://bucket/dst/ [--jobs 4] [--dry-run]

A single-frame series costs one GET per slice object the first time a patch touches it; one
multi-frame object per series costs about three coalesced GETs per patch, so a packed dataset's
first epoch costs what later epochs cost (docs/performance.md). The conversion is the standard's
own: highdicom's Legacy Converted Enhanced MR Image, which keeps every attribute of the source
slices (those no functional group takes go into its unassigned-attributes sequences), keeps the
pixel bytes as they are (compressed frames stay compressed; a big-endian source becomes explicit
little-endian, the same values), and records each frame's source instance
(ConversionSourceAttributesSequence). The series description is kept as it was, so sequences are
told apart as before.

What goes where, keys relative to ``src``:

- a series of two or more single-frame MR Image Storage objects becomes ``<folder>/<uid>.dcm`` in
  the folder that holds its slices (the folders layout stays the folders layout), with a new
  SeriesInstanceUID and SOPInstanceUID derived from the source series' UID (the same on every run);
- a segmentation or structure set that references a packed series is rewritten to reference the
  packed object and frame (ReferencedSOPInstanceUID, ReferencedFrameNumber, the referenced
  SeriesInstanceUID), with a new SOPInstanceUID derived from its own;
- every other object (multi-frame already, another class, not DICOM) is copied within S3;
- hidden objects (``.brainseg/`` index files, ``.DS_Store``) and DICOMDIRs (they index the source
  files) are left out.

A series that cannot be packed (mixed sizes or transfer syntaxes, a repeated SOPInstanceUID) is
copied as it is, with the reason in the report. Running the command again skips every object
already written from the same sources (S3 metadata ``brainseg-source``: a digest of the source
keys and ETags), so an interrupted run is finished by running it again. The report gives objects
and bytes before and after.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import multiprocessing
import posixpath
import sys
import time
import warnings
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import pydicom
from pydicom.uid import generate_uid

from brainseg.data.index import is_stray_name
from brainseg.io import s3
from brainseg.progress import Progress

logger = logging.getLogger("pack")
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
LEGACY_CONVERTED_MR = "1.2.840.10008.5.1.4.1.1.4.4"
REFERENCING_CLASSES = {"1.2.840.10008.5.1.4.1.1.66.4": "segmentation", "1.2.840.10008.5.1.4.1.1.481.3": "structure set"}
HEADER_BYTES = 64 * 1024  # a slice's header lies well within this; a longer one is read whole
SOURCE_METADATA = "brainseg-source"
PACK_VERSION = "1"  # part of every digest: a change of what packing writes redoes everything


class PackError(ValueError):
    """The source or destination cannot be packed as asked."""


@dataclass(frozen=True)
class SourceObject:
    """One object under the source prefix: ``key`` relative to it; DICOM fields empty when it is not DICOM."""

    key: str
    size: int
    etag: str
    sop_class: str = ""
    series_uid: str = ""
    instance_uid: str = ""
    frames: int = 0
    rows: int = 0
    columns: int = 0
    transfer_syntax: str = ""


@dataclass
class Plan:
    """What packing ``src`` into ``dst`` writes: ``series`` (folder, source objects) to pack,
    ``referencing`` objects to rewrite if they reference a packed series, ``copies`` as they are,
    ``left_out`` keys with the reason, ``unpacked`` series folders with why they stay single-frame."""

    series: list = field(default_factory=list)
    referencing: list = field(default_factory=list)
    copies: list = field(default_factory=list)
    left_out: dict = field(default_factory=dict)
    unpacked: dict = field(default_factory=dict)


def digest(*parts: str) -> str:
    return hashlib.sha256("\n".join((PACK_VERSION, *parts)).encode()).hexdigest()[:32]


def sources_digest(objects) -> str:
    """What a written object was made from: its sources' keys and ETags."""
    return digest(*(f"{item.key} {item.etag}" for item in sorted(objects, key=lambda item: item.key)))


def derived_uid(*parts: str) -> str:
    """A UID derived from ``parts`` (the same on every run, so a packed object keeps its UIDs)."""
    return generate_uid(entropy_srcs=["brainseg-pack", *parts])


def _parse(data: bytes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


def read_source(bucket: str, prefix: str, info: s3.ObjectInfo) -> SourceObject:
    """The fields packing needs from one object's header (one ranged GET; the whole object when
    the header does not fit in :data:`HEADER_BYTES`)."""
    key = info.key[len(prefix):]
    size = min(info.size, HEADER_BYTES)
    dataset = None
    try:
        dataset = _parse(s3.get_range(bucket, info.key, 0, size, info.etag) if size else b"")
    except Exception:  # a truncated header or not DICOM: decided below
        dataset = None
    needed = ("SOPClassUID", "SeriesInstanceUID", "SOPInstanceUID", "Rows")
    if (dataset is None or any(keyword not in dataset for keyword in needed)) and info.size > size:
        try:
            dataset = _parse(s3.get_range(bucket, info.key, 0, info.size, info.etag))
        except Exception:  # not DICOM: copied as it is
            dataset = None
    if dataset is None or "SOPClassUID" not in dataset:
        return SourceObject(key, info.size, info.etag)
    try:
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 0  # damaged: never packed
    meta = getattr(dataset, "file_meta", None)
    return SourceObject(key, info.size, info.etag, str(dataset.SOPClassUID), str(dataset.get("SeriesInstanceUID", "")),
                        str(dataset.get("SOPInstanceUID", "")), frames, int(dataset.get("Rows", 0) or 0),
                        int(dataset.get("Columns", 0) or 0),
                        str(getattr(meta, "TransferSyntaxUID", "") if meta is not None else ""))


def survey(uri: str) -> list[SourceObject]:
    """Every object under ``uri`` with its header's fields, read in parallel."""
    bucket, prefix = s3.parse_uri(uri.rstrip("/") + "/")
    listing = s3.list_tree(bucket, prefix)
    return list(s3.executor().map(lambda info: read_source(bucket, prefix, info), listing))


def _unpackable(objects: list[SourceObject]) -> str:
    """Why a series' objects cannot become one object ("" when they can)."""
    for name, values in (("Rows x Columns", {(item.rows, item.columns) for item in objects}),
                         ("transfer syntaxes", {item.transfer_syntax for item in objects})):
        if len(values) > 1:
            return f"its slices differ in {name} ({', '.join(sorted(map(str, values)))})"
    if len({item.instance_uid for item in objects}) < len(objects):
        return "two of its objects have the same SOPInstanceUID"
    return ""


def plan(objects: list[SourceObject]) -> Plan:
    """Which series are packed, which objects are rewritten, copied or left out."""
    out = Plan()
    groups = defaultdict(list)
    for item in objects:
        hidden = next((part for part in item.key.split("/")[:-1] if part.startswith(".")), "")
        reason = f"in a hidden folder ({hidden}/)" if hidden else is_stray_name(item.key)
        if reason:
            out.left_out[item.key] = reason
        elif item.sop_class in REFERENCING_CLASSES:
            out.referencing.append(item)
        elif item.sop_class == MR_IMAGE_STORAGE and item.frames == 1 and item.series_uid:
            groups[(posixpath.dirname(item.key), item.series_uid)].append(item)
        else:
            out.copies.append(item)
    for (folder, _), members in sorted(groups.items()):
        reason = "it has one slice" if len(members) < 2 else _unpackable(members)
        if reason:
            out.unpacked[folder or "."] = reason
            out.copies += members
        else:
            out.series.append((folder, sorted(members, key=lambda item: item.key)))
    return out


def packed_key(folder: str, series_uid: str) -> str:
    return posixpath.join(folder, f"{derived_uid(series_uid, 'series')}.dcm")


def _encoded(dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _frame_map(dataset) -> dict[str, tuple[str, int]]:
    """Each source SOPInstanceUID of a packed object with ``(packed SOPInstanceUID, frame number)``."""
    out = {}
    for number, item in enumerate(dataset.PerFrameFunctionalGroupsSequence, start=1):
        for source in item.get("ConversionSourceAttributesSequence", []):
            out[str(source.ReferencedSOPInstanceUID)] = (str(dataset.SOPInstanceUID), number)
    return out


def _read_packed_header(uri: str, size: int) -> dict[str, tuple[str, int]]:
    """The frame map of an object packed by an earlier run (its header: a growing ranged read)."""
    bucket, key = s3.parse_uri(uri)
    length = HEADER_BYTES * 4
    while True:
        try:
            return _frame_map(_parse(s3.get_range(bucket, key, 0, min(length, size))))
        except Exception:  # a header longer than the bytes read so far
            if length >= size:
                raise
            length *= 4


def pack_series(src: str, dst: str, folder: str, members: list[SourceObject]) -> dict:
    """Write one series' packed object (unless an earlier run wrote it from the same sources);
    returns ``{"bytes", "frames": {source UID: (packed UID, frame)}, "resumed", "error"}``. An error
    leaves the series out, never the run."""
    import highdicom

    logging.getLogger("highdicom").setLevel(logging.ERROR)  # a spawned worker: its lines quote the sources' UIDs
    key, source_digest = packed_key(folder, members[0].series_uid), sources_digest(members)
    uri = f"{dst}{key}"
    result = {"bytes": 0, "frames": {}, "resumed": False, "error": ""}
    bucket, prefix = s3.parse_uri(src)
    try:
        written = _written_from(uri, source_digest)
        if written is not None:
            result.update(bytes=written.size, frames=_read_packed_header(uri, written.size), resumed=True)
            return result
        datasets = []
        for data in s3.executor().map(lambda item: s3.get_range(bucket, prefix + item.key, 0, item.size, item.etag),
                                      members):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                datasets.append(pydicom.dcmread(io.BytesIO(data)))
        description = datasets[0].get("SeriesDescription")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            packed = highdicom.legacy.LegacyConvertedEnhancedMRImage(
                datasets, series_instance_uid=derived_uid(members[0].series_uid, "series"),
                series_number=int(datasets[0].get("SeriesNumber", 1) or 1),
                sop_instance_uid=derived_uid(members[0].series_uid, "instance"), instance_number=1)
        if description is None:
            del packed.SeriesDescription
        else:
            packed.SeriesDescription = description  # highdicom appends " (enhanced conversion)"
        data = _encoded(packed)
        s3.put_bytes(uri, data, "application/dicom", metadata={SOURCE_METADATA: source_digest})
        result.update(bytes=len(data), frames=_frame_map(packed))
    except Exception as err:  # reported per series; the others go on
        result["error"] = f"{type(err).__name__}: {err}"
    return result


def rewrite_references(dataset, series: dict[str, str], frames: dict[str, tuple[str, int]]) -> int:
    """Point every reference to a packed source at the packed object: an item's ReferencedSOPInstanceUID
    becomes the packed instance with its ReferencedFrameNumber (and class), a SeriesInstanceUID inside
    a sequence the packed series. Returns the references changed."""
    changed = 0
    for element in dataset:
        if element.VR != "SQ":
            continue
        for item in element.value:
            uid = str(item.get("ReferencedSOPInstanceUID", ""))
            if uid in frames:
                item.ReferencedSOPInstanceUID, item.ReferencedFrameNumber = frames[uid]
                if "ReferencedSOPClassUID" in item:
                    item.ReferencedSOPClassUID = LEGACY_CONVERTED_MR
                changed += 1
            uid = str(item.get("SeriesInstanceUID", ""))
            if uid in series:
                item.SeriesInstanceUID = series[uid]
                changed += 1
            changed += rewrite_references(item, series, frames)
    return changed


def _write_referencing(src: str, dst: str, item: SourceObject, series: dict, frames: dict) -> tuple[str, int, bool]:
    """``(how, bytes, skipped)``: a segmentation or structure set rewritten (or copied when it
    references no packed series)."""
    bucket, prefix = s3.parse_uri(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = pydicom.dcmread(io.BytesIO(s3.get_range(bucket, prefix + item.key, 0, item.size, item.etag)))
    if not rewrite_references(dataset, series, frames):
        return ("copied", item.size, _copy(src, dst, item))
    dataset.SOPInstanceUID = derived_uid(str(dataset.SOPInstanceUID), "references")
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    data = _encoded(dataset)
    made = digest(hashlib.sha256(data).hexdigest())
    uri = f"{dst}{item.key}"
    if _written_from(uri, made):
        return ("rewritten", len(data), True)
    s3.put_bytes(uri, data, "application/dicom", metadata={SOURCE_METADATA: made})
    return ("rewritten", len(data), False)


def _written_from(uri: str, made: str) -> s3.Head | None:
    """The object at ``uri`` when a run wrote it from the same sources (``made``: their digest), else ``None``."""
    written = s3.head(uri)
    return written if written is not None and written.metadata.get(SOURCE_METADATA) == made else None


def _copy(src: str, dst: str, item: SourceObject) -> bool:
    """Copy one object within S3 unless an earlier run copied it from the same source; True when skipped."""
    made, uri = sources_digest([item]), f"{dst}{item.key}"
    if _written_from(uri, made):
        return True
    s3.copy_object(f"{src}{item.key}", uri, {SOURCE_METADATA: made})
    return False


def pack(src: str, dst: str, jobs: int = 4, dry_run: bool = False) -> dict:
    """Pack every single-frame series under ``src`` into ``dst`` (see the module's docstring); returns the report.

    Raises:
        PackError: ``src`` and ``dst`` overlap, or ``src`` holds nothing.
    """
    src, dst = src.rstrip("/") + "/", dst.rstrip("/") + "/"
    if src.startswith(dst) or dst.startswith(src):
        raise PackError(f"{dst} and {src} overlap: the packed dataset must go to a prefix of its own")
    started = time.perf_counter()
    objects = survey(src)
    if not objects:
        raise PackError(f"no object under {src}")
    work = plan(objects)
    packed_objects = sum(len(members) for _, members in work.series)
    report = {"objects_before": len(objects) - len(work.left_out),
              "bytes_before": sum(item.size for item in objects if item.key not in work.left_out),
              "series_packed": len(work.series), "slices_packed": packed_objects,
              "left_out": work.left_out, "left_single_frame": work.unpacked, "failed": {}, "resumed": 0}
    if dry_run:
        report.update(objects_after=report["objects_before"] - packed_objects + len(work.series),
                      seconds=round(time.perf_counter() - started, 1))
        return report
    after_objects, after_bytes, series_map, frame_map = 0, 0, {}, {}
    progress = Progress(len(work.series), phase="pack", unit="series", log_seconds=30.0)
    # Spawned, not forked: a fork of a process whose threads hold locks (an S3 pool, logging) can hang.
    with progress, ProcessPoolExecutor(max(1, jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(pack_series, src, dst, folder, members) for folder, members in work.series]
        for number, ((folder, members), future) in enumerate(zip(work.series, futures), start=1):
            result = future.result()
            if result["error"]:
                report["failed"][folder or "."] = result["error"]
                logger.warning("series in %s not packed: %s", folder or ".", result["error"])
            else:
                after_objects += 1
                after_bytes += result["bytes"]
                report["resumed"] += result["resumed"]
                series_map[members[0].series_uid] = derived_uid(members[0].series_uid, "series")
                frame_map.update(result["frames"])
            progress.update(number)
    # A series that failed to pack is copied as it is: nothing of the source is lost.
    copies = work.copies + [item for folder, members in work.series if (folder or ".") in report["failed"]
                            for item in members]
    writes = [(item, lambda item: ("copied", item.size, _copy(src, dst, item))) for item in copies]
    writes += [(item, lambda item: _write_referencing(src, dst, item, series_map, frame_map))
               for item in work.referencing]
    report["references_rewritten"] = 0
    for how, size, skipped in s3.executor().map(lambda pair: pair[1](pair[0]), writes):
        after_objects += 1
        after_bytes += size
        report["resumed"] += skipped
        report["references_rewritten"] += how == "rewritten"
    report.update(objects_after=after_objects, bytes_after=after_bytes, seconds=round(time.perf_counter() - started, 1))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="s3://bucket/prefix/ of the dataset as it is")
    parser.add_argument("dst", help="s3://bucket/prefix/ the packed dataset is written to (not inside src)")
    parser.add_argument("--jobs", type=int, default=4, help="series packed at once (processes)")
    parser.add_argument("--dry-run", action="store_true", help="survey and plan only: print what would be written")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        for uri in (args.src, args.dst):
            s3.parse_uri(uri)
        report = pack(args.src, args.dst, args.jobs, args.dry_run)
    except (PackError, ValueError, s3.S3Error) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for key, reason in report["left_out"].items():
        print(f"left out {key}: {reason}", file=sys.stderr)
    for folder, reason in report["left_single_frame"].items():
        print(f"not packed {folder}: {reason}", file=sys.stderr)
    for folder, error in report["failed"].items():
        print(f"failed {folder}: {error}", file=sys.stderr)
    if args.dry_run:
        print(f"would pack {report['series_packed']} series ({report['slices_packed']} objects): "
              f"{report['objects_before']} objects ({report['bytes_before'] / 1e6:.1f} MB) would become "
              f"{report['objects_after']}")
        return 0
    print(f"packed {report['series_packed'] - len(report['failed'])} series ({report['resumed']} object(s) already "
          f"written by an earlier run), rewrote {report['references_rewritten']} referencing object(s): "
          f"{report['objects_before']} objects, {report['bytes_before'] / 1e6:.1f} MB -> {report['objects_after']} "
          f"objects, {report['bytes_after'] / 1e6:.1f} MB, in {report['seconds']} s")
    return 1 if report["failed"] else 0
