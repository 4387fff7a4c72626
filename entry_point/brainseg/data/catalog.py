"""The catalog: every case under a dataset prefix, checked, summarised and split.

``build_catalog(uri)`` lists the prefix (or, trusting a saved index, does not), indexes the
headers it has not seen (:mod:`brainseg.data.index`), assembles and checks each case's sequence
series and mask (:mod:`brainseg.data.quality`; every sequence and the mask on one voxel grid),
summarises new cases (:mod:`brainseg.data.summary`), excludes duplicates across cases, and assigns
splits (:mod:`brainseg.data.splits`).
"""

from __future__ import annotations

import hashlib
import logging
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from brainseg.data.index import (
    MAX_HEADER_BYTES,
    HeaderIndex,
    identity_key,
    is_stray_name,
    key_id,
    load_index,
    read_header,
    save_index,
)
from brainseg.data.quality import IndexedObject, QualityError, assemble_series, check_grid
from brainseg.data.segmentation import SegmentationMask
from brainseg.data.series import Series
from brainseg.data.splits import DEFAULT_SPLIT_FRACTIONS, SPLITS, assign_splits, parse_manifest
from brainseg.data.summary import CaseSummary, summarise_case
from brainseg.io import s3
from brainseg.labels import MAX_LABEL, LabelScheme

logger = logging.getLogger(__name__)

INDEX_DIR = ".brainseg"
MANIFEST_NAME = "manifest.csv"
CASE_WORKERS = 4  # cases summarised concurrently, each with its own concurrent range reads
IMAGE_ONLY = ("image",)  # the single-sequence layout: <case>/image/ and <case>/mask/


@dataclass(frozen=True)
class Case:
    """A usable case: one checked series per sequence (channel order; ``None`` for a zero-filled
    missing sequence, named in ``missing``), its mask, summary and split. ``skipped`` lists the
    non-image objects found in its series folders and why each was skipped."""

    case_id: str
    split: str
    images: tuple
    mask: Series | SegmentationMask | None
    summary: CaseSummary
    patient_group: str = ""
    skipped: tuple = ()
    missing: tuple = ()
    target_spacing: tuple = ()  # (dz, dy, dx) mm the network sees the case at; () native

    @property
    def image(self) -> Series:
        """The first sequence present: the voxel grid every channel and the mask share."""
        return next(series for series in self.images if series is not None)

    @property
    def channels(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class Exclusion:
    """A case folder that cannot be used, and why."""

    case_id: str
    reason: str
    skipped: tuple = ()


@dataclass(frozen=True)
class Catalog:
    """The usable cases under ``uri`` (by case ID) with their splits, and the excluded ones."""

    uri: str
    cases: tuple[Case, ...]
    exclusions: tuple[Exclusion, ...]
    fingerprint: str
    index_stats: dict = field(default_factory=dict)
    manifest: bool = False  # the splits come from manifest.csv, not the seeded shuffle

    def split(self, name: str) -> list[Case]:
        """The cases of one split (``"train"``, ``"val"`` or ``"test"``)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return [case for case in self.cases if case.split == name]


def _index_uri_for(uri: str) -> str:
    return uri.rstrip("/") + f"/{INDEX_DIR}/index.jsonl"


def check_index_location(uri: str, index_uri: str) -> None:
    """Inside the dataset an index may live only under ``<data>/.brainseg/``, never in a case folder.

    Raises:
        ValueError: ``index_uri`` lies elsewhere inside the data prefix.
    """
    if index_uri.startswith(uri) and not index_uri.startswith(uri + INDEX_DIR + "/"):
        raise ValueError(f"index_uri {index_uri} is inside the dataset {uri} but not under its {INDEX_DIR}/ "
                         f"folder; it would be listed as data (or overwrite it). Use {_index_uri_for(uri)} "
                         "or a location outside the dataset")


def _layout_hint(uri: str, listing: list[s3.ObjectInfo], prefix: str, folders: tuple) -> str:
    """Why no object sits in ``<case>/<sequence>/`` or ``<case>/mask/``, when the layout says so."""
    parts = [info.key[len(prefix):].split("/") for info in listing]
    deeper = sorted({p[0] for p in parts if len(p) >= 4 and p[2] in folders})
    if deeper:
        return (f"; cases seem to be one level down, under {uri}{deeper[0]}/ (pass that as the data URI)")
    if any(len(p) >= 2 and p[0] in folders for p in parts):
        parent = uri.rstrip("/").rsplit("/", 1)[0] + "/"
        return f"; {uri} looks like a single case folder (it holds {'/ or '.join(folders)}/): pass its parent {parent}"
    found = sorted({p[1] for p in parts if len(p) >= 3 and p[0] != INDEX_DIR} - set(folders))
    if found:
        return f"; the case folders hold {', '.join(found[:6])}/: name the sequences with --sequences"
    return ""


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def _group_objects(prefix: str, listing: list[s3.ObjectInfo], folders: tuple):
    """``{case_id: {folder: [...]}}`` for the sequence and mask ``folders``, the manifest object, the
    number of ignored keys, and ``{case_id: other folder names}``."""
    cases: dict[str, dict[str, list[s3.ObjectInfo]]] = {}
    others: dict[str, set[str]] = {}
    manifest, ignored = None, 0
    for info in listing:
        relative = info.key[len(prefix):]
        parts = relative.split("/")
        if relative == MANIFEST_NAME:
            manifest = info
        elif parts[0] == INDEX_DIR or relative.endswith("/"):
            continue
        elif len(parts) >= 3 and parts[1] in folders:
            cases.setdefault(parts[0], {folder: [] for folder in folders})[parts[1]].append(info)
        elif len(parts) >= 2:
            cases.setdefault(parts[0], {folder: [] for folder in folders})
            if len(parts) >= 3:
                others.setdefault(parts[0], set()).add(parts[1])
            ignored += 1
        else:
            ignored += 1
    return cases, manifest, ignored, others


def _objects_fingerprint(objects, extra: bytes = b"") -> str:
    """Hash of the keys and ETags of ``objects`` (any order) and ``extra`` bytes."""
    digest = hashlib.sha256(extra)
    for info in sorted(objects, key=lambda o: o.key):
        digest.update(f"{info.key}\0{info.etag}\0".encode())
    return digest.hexdigest()[:24]


def build_catalog(uri: str, *, index_uri: str | None = None, seed: int = 0,
                  split_fractions=DEFAULT_SPLIT_FRACTIONS, exclude_empty_masks: bool = True,
                  refresh_index: bool = False, trust_index: bool = False,
                  require_masks: bool = True, max_header_bytes: int = MAX_HEADER_BYTES,
                  sequences: tuple = IMAGE_ONLY, zero_fill: bool = False, labels: LabelScheme | None = None) -> Catalog:
    """Index, check, summarise and split every case under ``uri``.

    Args:
        uri: the dataset prefix ``s3://bucket/prefix/`` (layout in the README).
        index_uri: where the header index JSON lives (default ``<uri>/.brainseg/index.jsonl``);
            it is reused when present and rewritten when anything changed.
        seed: seed of the patient-level split (ignored when ``manifest.csv`` exists).
        split_fractions: train/val/test fractions of the seeded split.
        exclude_empty_masks: exclude cases whose mask has no tumour voxel.
        refresh_index: ignore a saved index and read every header again.
        trust_index: start from a saved index without listing the prefix, so start-up costs the
            same whatever the dataset size. Objects changed since indexing fail at read time
            (every range carries the indexed ETag); cases added since are not seen. Without a
            saved index this lists the prefix as usual.
        require_masks: with ``False`` (self-supervised pretraining) a case without a ``mask/``
            folder is usable; its ``mask`` is ``None`` and its summary has no tumour.
        max_header_bytes: a header that does not end within this many bytes is refused.
        sequences: the sequence folders of a case, in channel order (``("image",)``: the
            single-sequence layout). Every sequence and the mask must share one voxel grid.
        zero_fill: a case lacking some (not all) sequences stays usable; the missing channels read
            as zeros and are listed in ``Case.missing``. Otherwise such a case is excluded.
        labels: when given, a case whose mask holds a label value none of its classes covers (or
            one above 255) is excluded, rather than having that value read as background.

    Raises:
        ValueError: ``uri`` is not an S3 prefix or holds no case folder (with a hint when the
            cases are one level up or down), the manifest is malformed, or ``index_uri`` is in a
            case folder or holds something other than an index.
        s3.S3Error: the bucket cannot be listed.
    """
    bucket, prefix = s3.parse_uri(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    uri = f"s3://{bucket}/{prefix}"
    index_uri = index_uri or _index_uri_for(uri)
    check_index_location(uri, index_uri)
    started = time.perf_counter()
    key = identity_key(index_uri)
    index = load_index(index_uri, key_id(key), refresh=refresh_index)
    manifest_uri = uri + MANIFEST_NAME
    if trust_index and index.objects:
        listing = [s3.ObjectInfo(obj.key, obj.size, obj.etag) for obj in index.objects.values()]
        manifest_bytes = s3.read_uri(manifest_uri)
        logger.info("using the saved index %s (%d objects) without listing %s", index_uri, len(listing), uri)
    else:
        listing = s3.list_tree(bucket, prefix)
        manifest_bytes = None
    sequences = tuple(sequences)
    folders = sequences + ("mask",)
    grouped, manifest_info, ignored, other_folders = _group_objects(prefix, listing, folders)
    if manifest_info is not None:
        manifest_bytes = s3.get_object(bucket, manifest_info.key)
    if not any(series for parts in grouped.values() for series in parts.values()):
        raise ValueError(f"no case folders under {uri}: expected <case_id>/{{{','.join(sequences)}}}/*.dcm and "
                         f"<case_id>/mask/*.dcm ({len(listing)} objects listed)"
                         f"{_layout_hint(uri, listing, prefix, folders)}")
    if ignored:
        logger.info("ignored %d object(s) outside <case>/{%s}/", ignored, ",".join(folders))

    case_objects = [info for parts in grouped.values() for series in parts.values() for info in series]
    objects: dict[str, IndexedObject] = {}
    to_read = []
    for info in case_objects:
        saved = index.objects.get(info.key)
        if saved is not None and saved.etag == info.etag and saved.size == info.size:
            objects[info.key] = saved
        else:
            to_read.append(info)
    read_started = time.perf_counter()

    def read(info: s3.ObjectInfo) -> IndexedObject:
        stray = is_stray_name(info.key)
        if stray:
            return IndexedObject(info.key, info.size, info.etag, None, stray, stray=True)
        return read_header(bucket, info, key, max_header_bytes)

    for indexed in s3.executor().map(read, to_read):
        objects[indexed.key] = indexed
    read_seconds = time.perf_counter() - read_started

    # Each pass looks only at the cases no earlier pass excluded; the first reason stands.
    reasons: dict[str, str] = {}
    skipped: dict[str, tuple] = {}
    series: dict[str, tuple[dict[str, Series | None], Series | None]] = {}
    missing: dict[str, tuple] = {}
    for case_id in sorted(grouped):
        parts = {folder: [objects[info.key] for info in sorted(grouped[case_id][folder], key=lambda o: o.key)]
                 for folder in folders}
        skipped[case_id] = tuple(f"{folder}/{obj.name}: {obj.error}" for folder in folders
                                 for obj in parts[folder] if obj.stray)
        try:
            series[case_id] = assemble_case(bucket, sequences, parts, zero_fill, require_masks,
                                             sorted(other_folders.get(case_id, ())))
            missing[case_id] = tuple(name for name, item in series[case_id][0].items() if item is None)
        except QualityError as err:
            reasons[case_id] = str(err)

    summaries: dict[str, tuple[str, CaseSummary]] = {}
    pending = []
    for case_id in series:
        if case_id in reasons:
            continue
        case_fingerprint = _objects_fingerprint([info for folder in folders for info in grouped[case_id][folder]],
                                                ",".join(sequences).encode())
        saved = index.cases.get(case_id)
        if saved is not None and saved[0] == case_fingerprint:
            summaries[case_id] = saved
        else:
            pending.append((case_id, case_fingerprint))
    with ThreadPoolExecutor(CASE_WORKERS, thread_name_prefix="case-summary") as pool:
        futures = [(case_id, case_fingerprint, pool.submit(summarise_case, case_id, *series[case_id]))
                   for case_id, case_fingerprint in pending]
        for case_id, case_fingerprint, future in futures:
            try:
                summaries[case_id] = (case_fingerprint, future.result())
            except (s3.S3Error, ValueError) as err:
                reasons[case_id] = f"pixel data unreadable: {err}"
    for case_id in series:
        if case_id not in reasons and exclude_empty_masks and require_masks \
                and summaries[case_id][1].tumour_voxels == 0:
            reasons[case_id] = "mask is empty (no tumour voxels); label it or pass exclude_empty_masks=False"
        elif case_id not in reasons and labels is not None and summaries[case_id][1].label_counts:
            reason = _label_problem(summaries[case_id][1], labels)
            if reason:
                reasons[case_id] = reason
    present = {case_id: [item for item in images.values() if item is not None] for case_id, (images, _) in series.items()}
    reasons.update(_cross_case_duplicates(present, reasons))

    groups = {case_id: min(hashes) if (hashes := {h.patient_hash for item in items for h in item.headers
                                                  if h.patient_hash}) else ""
              for case_id, items in present.items()}
    if manifest_bytes is not None:
        manifest = {_nfc(name): split for name, split in parse_manifest(manifest_uri, manifest_bytes).items()}
        unknown = sorted(set(manifest) - {_nfc(case_id) for case_id in grouped})
        if unknown:
            logger.warning("manifest.csv lists %d case(s) not found under %s: %s", len(unknown), uri,
                           ", ".join(unknown[:5]))
        for case_id in series:
            if case_id not in reasons and _nfc(case_id) not in manifest:
                reasons[case_id] = "not listed in manifest.csv"
        splits = {case_id: manifest[_nfc(case_id)] for case_id in series if case_id not in reasons}
    else:
        splits = assign_splits({case_id: groups[case_id] for case_id in series if case_id not in reasons}, seed,
                               split_fractions)
    cases = tuple(Case(case_id, splits[case_id], tuple(series[case_id][0].values()), series[case_id][1],
                       summaries[case_id][1], groups[case_id], skipped[case_id], missing[case_id])
                  for case_id in sorted(splits))
    exclusions = tuple(Exclusion(case_id, reasons[case_id], skipped[case_id]) for case_id in sorted(reasons))

    if to_read or pending or objects.keys() != index.objects.keys():
        save_index(index_uri, HeaderIndex(index.key_id, objects, summaries))
    # What training reads: the case objects and the manifest.
    fingerprint = _objects_fingerprint(case_objects, manifest_bytes or b"")[:16]
    stats = {
        "objects": len(case_objects),
        "headers_read": len(to_read),
        "headers_reused": len(objects) - len(to_read),
        "header_seconds": round(read_seconds, 3),
        "headers_per_s": round(len(to_read) / read_seconds, 1) if to_read and read_seconds > 0 else None,
        "cases_summarised": len(pending),
        "seconds": round(time.perf_counter() - started, 3),
    }
    catalog = Catalog(uri=uri, cases=cases, exclusions=exclusions, fingerprint=fingerprint, index_stats=stats,
                      manifest=manifest_bytes is not None)
    for exclusion in exclusions:
        logger.warning("case %s excluded: %s", exclusion.case_id, exclusion.reason)
    for case in cases:
        if case.missing:
            logger.warning("case %s: sequence(s) %s missing, zero-filled", case.case_id, ", ".join(case.missing))
    for case_id, items in sorted(skipped.items()):
        if items:
            logger.warning("case %s: skipped %d non-image object(s): %s", case_id, len(items),
                           "; ".join(items[:3]) + (" ..." if len(items) > 3 else ""))
    logger.info("catalog %s: %d cases, %d usable (train %d, val %d, test %d), %d excluded; %s",
                uri, len(grouped), len(cases), len(catalog.split("train")), len(catalog.split("val")),
                len(catalog.split("test")), len(exclusions), stats)
    return catalog


def assemble_case(bucket: str, sequences: tuple, parts: dict, zero_fill: bool, require_masks: bool,
                   other_folders: list[str]) -> tuple[dict[str, Series | None], Series | SegmentationMask | None]:
    """Each sequence's series (``None`` when absent and ``zero_fill``) and the mask, on one grid.

    Raises:
        QualityError: a sequence or the mask fails its checks, is absent (without ``zero_fill``),
            or lies on another grid than the first sequence present.
    """
    absent = [name for name in sequences if not parts[name]]
    if len(absent) == len(sequences) and other_folders:
        folders = ", ".join(f"{name}/" for name in other_folders)
        raise QualityError(f"no {'/, '.join(sequences)}/ folder, but the case holds {folders}: name its sequence "
                           f"folders with --sequences (e.g. --sequences {','.join(other_folders)})")
    if absent and len(sequences) > 1 and len(absent) < len(sequences) and not zero_fill:
        have = ", ".join(name for name in sequences if name not in absent)
        raise QualityError(f"missing sequence(s) {', '.join(absent)}: no objects under {absent[0]}/ (the case has "
                           f"{have}); add it, or zero-fill it with --missing-sequences zero")
    images = {name: assemble_series(bucket, name, parts[name]) if parts[name] or len(absent) == len(sequences)
              else None for name in sequences}
    reference_name = next(name for name in sequences if images[name] is not None)
    reference = images[reference_name]
    for name, item in images.items():
        if item is not None and name != reference_name:
            check_grid(reference, item, name, reference_name)
    mask = None
    segmentations = [obj for obj in parts["mask"] if obj.header is not None and obj.header.is_segmentation]
    if segmentations:
        others = [obj for obj in parts["mask"] if not obj.stray and obj not in segmentations]
        if len(segmentations) > 1 or others:
            raise QualityError(f"mask/ holds a DICOM SEG ({segmentations[0].name}) and {len(segmentations) + len(others) - 1} other "
                               "image object(s); keep one SEG object, or a label series, per mask folder")
        mask = SegmentationMask.on_grid(bucket, segmentations[0], reference, reference_name)
    elif parts["mask"] or require_masks:
        mask = assemble_series(bucket, "mask", parts["mask"])
        check_grid(reference, mask, "mask", reference_name)
    return images, mask


def _label_problem(summary: CaseSummary, labels: LabelScheme) -> str:
    """Why a mask's label values do not fit the classes ("" when they do)."""
    values = [value for value, _ in summary.label_counts]
    if max(values) > MAX_LABEL:
        return f"mask holds label value {max(values)}; label values must lie in 0..{MAX_LABEL}"
    unknown = labels.unknown_values(values)
    if unknown:
        classes = ", ".join(f"{c.name}={'+'.join(map(str, sorted(c.values)))}" for c in labels.classes)
        return (f"mask holds label value(s) {', '.join(map(str, unknown))} that no class of --labels covers "
                f"({classes}); add them to a class or relabel the mask")
    return ""


def _cross_case_duplicates(images: dict[str, list[Series]], reasons: dict[str, str]) -> dict[str, str]:
    """Cases whose image objects repeat an earlier case's (same content or same SOP instance), by case
    ID order; ``{case_id: reason}`` for those not already excluded."""
    seen: dict[str, str] = {}
    duplicates = {}
    for case_id in sorted(images):
        marks = {f"etag:{etag}" for image in images[case_id] for etag in image.etags}
        marks |= {f"sop:{header.instance_hash}" for image in images[case_id] for header in image.headers
                  if header.instance_hash}
        first = sorted({seen[mark] for mark in marks if mark in seen})
        if first and case_id not in reasons:
            duplicates[case_id] = (f"image objects duplicate those of case {first[0]} (copied or "
                                   "mislabelled patient folder)")
        for mark in marks:
            seen.setdefault(mark, case_id)
    return duplicates
