"""The catalog: every case under a dataset prefix, checked, summarised and split.

``build_catalog(uri)`` lists the prefix, parses each DICOM header from a small ranged read
(growing the range until the pixel data is located), assembles and checks each case's image and
mask series, summarises their content (intensity statistics from a few slices, tumour voxels and
sample points from the mask), and assigns patient-level splits. Headers and summaries are saved
as JSON keyed by object ETags, so the next job reuses them without reading a header again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from brainseg import s3io
from brainseg.dicom import HeaderError, NeedMoreBytes, ObjectHeader, parse_header
from brainseg.quality import IndexedObject, QualityError, assemble_series, check_pair
from brainseg.series import Series

logger = logging.getLogger(__name__)

INDEX_VERSION = 2
INDEX_DIR = ".brainseg"
MANIFEST_NAME = "manifest.csv"
HEADER_PREFIX_BYTES = 8 * 1024  # 8 KiB: a classic slice header fits; enhanced objects grow it
SPLITS = ("train", "val", "test")
DEFAULT_SPLIT_FRACTIONS = (0.5, 0.2, 0.3)
STAT_SLICES = 8  # slices read per case to estimate intensity statistics
FOREGROUND_POINTS = 256  # tumour voxel coordinates kept per case for foreground sampling
MASK_CHUNK_SLICES = 16  # mask slices read at once when summarising (bounds memory)
CASE_WORKERS = 4  # cases summarised concurrently, each with its own concurrent range reads


@dataclass(frozen=True, slots=True)
class CaseSummary:
    """Content statistics of one case, computed once and cached in the index.

    Intensity statistics come from ``STAT_SLICES`` evenly spaced image slices: ``low`` and
    ``high`` are the 0.5 and 99.5 percentiles, ``mean`` and ``std`` are over body voxels
    (above ``low + 10%`` of the robust range). Tumour figures come from the whole mask.
    """

    minimum: float
    maximum: float
    low: float
    high: float
    mean: float
    std: float
    tumour_voxels: int
    tumour_ml: float
    tumour_bbox: tuple  # (z0, z1, y0, y1, x0, x1), or () when the mask is empty
    foreground_points: tuple  # ((z, y, x), ...), up to FOREGROUND_POINTS

    @classmethod
    def from_json(cls, data: dict) -> "CaseSummary":
        fields = dict(data)
        fields["tumour_bbox"] = tuple(fields["tumour_bbox"])
        fields["foreground_points"] = tuple(tuple(p) for p in fields["foreground_points"])
        return cls(**fields)


@dataclass
class Case:
    """One patient case folder: ``status`` is ``"ok"`` or ``"excluded"`` (then ``reason`` says why)."""

    case_id: str
    split: str = ""
    status: str = "ok"
    reason: str = ""
    image: Series | None = None
    mask: Series | None = None
    summary: CaseSummary | None = None
    patient_group: str = ""

    def exclude(self, reason: str) -> None:
        self.status, self.reason, self.split = "excluded", reason, ""


@dataclass
class Catalog:
    """Every case under ``uri`` with its checks, summary and split."""

    uri: str
    cases: list[Case]
    fingerprint: str
    index_stats: dict = field(default_factory=dict)

    def split(self, name: str) -> list[Case]:
        """The usable cases of one split (``"train"``, ``"val"`` or ``"test"``)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return [case for case in self.cases if case.status == "ok" and case.split == name]

    def excluded(self) -> list[Case]:
        return [case for case in self.cases if case.status == "excluded"]


def _index_uri_for(uri: str) -> str:
    return uri.rstrip("/") + f"/{INDEX_DIR}/index.jsonl"


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

    Stored as JSON Lines (a version line, one line per object, one per case) and streamed in
    both directions, so a dataset of any size never sits in memory as one document.
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


def _load_index(index_uri: str) -> HeaderIndex:
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


def _save_index(index_uri: str, index: HeaderIndex) -> None:
    try:
        s3io.write_lines(index_uri, index.lines())
    except s3io.S3Error as err:
        logger.warning("could not save the header index to %s (%s); the next job will read the "
                       "headers again. Pass a writable index location to keep it.", index_uri, err)


def _group_objects(prefix: str, listing: list[s3io.ObjectInfo]):
    """``{case_id: {"image": [...], "mask": [...]}}``, the manifest object, and ignored keys."""
    cases: dict[str, dict[str, list[s3io.ObjectInfo]]] = {}
    manifest, ignored = None, 0
    for info in listing:
        relative = info.key[len(prefix):]
        parts = relative.split("/")
        if relative == MANIFEST_NAME:
            manifest = info
        elif parts[0] == INDEX_DIR or relative.endswith("/"):
            continue
        elif len(parts) >= 3 and parts[1] in ("image", "mask"):
            cases.setdefault(parts[0], {"image": [], "mask": []})[parts[1]].append(info)
        elif len(parts) >= 2:
            cases.setdefault(parts[0], {"image": [], "mask": []})
            ignored += 1
        else:
            ignored += 1
    return cases, manifest, ignored


def _objects_fingerprint(objects, extra: bytes = b"") -> str:
    """Hash of the keys and ETags of ``objects`` (any order) and ``extra`` bytes."""
    digest = hashlib.sha256(extra)
    for info in sorted(objects, key=lambda o: o.key):
        digest.update(f"{info.key}\0{info.etag}\0".encode())
    return digest.hexdigest()[:24]


def _stable_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def summarise_case(case_id: str, image: Series, mask: Series) -> CaseSummary:
    """Intensity statistics from a few image slices and the tumour content of the whole mask."""
    depth = image.shape[0]
    picks = sorted({int(round(z)) for z in np.linspace(0, depth - 1, min(STAT_SLICES, depth))})
    values = image.read_planes(picks).ravel()
    low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    body = values[values > low + 0.1 * (high - low)]
    if body.size < 100:
        body = values
    voxels = 0
    bbox_low = np.full(3, np.iinfo(np.int64).max)
    bbox_high = np.full(3, -1)
    rng = np.random.default_rng(_stable_seed(case_id))
    reservoir: list[np.ndarray] = []
    for z0 in range(0, depth, MASK_CHUNK_SLICES):
        z1 = min(depth, z0 + MASK_CHUNK_SLICES)
        chunk = mask.read_region(z0, z1, 0, mask.shape[1], 0, mask.shape[2])
        points = np.argwhere(chunk > 0)
        if not points.size:
            continue
        points[:, 0] += z0
        voxels += len(points)
        bbox_low = np.minimum(bbox_low, points.min(axis=0))
        bbox_high = np.maximum(bbox_high, points.max(axis=0))
        take = min(len(points), FOREGROUND_POINTS)
        reservoir.append(points[rng.choice(len(points), take, replace=False)])
    if reservoir:
        pool = np.concatenate(reservoir)
        chosen = pool[rng.choice(len(pool), min(len(pool), FOREGROUND_POINTS), replace=False)]
        foreground = tuple(tuple(int(v) for v in p) for p in chosen[np.lexsort(chosen.T[::-1])])
        bbox = tuple(int(v) for pair in zip(bbox_low, bbox_high + 1) for v in pair)
    else:
        foreground, bbox = (), ()
    return CaseSummary(
        minimum=float(values.min()), maximum=float(values.max()), low=low, high=high,
        mean=float(body.mean()), std=float(max(body.std(), 1e-6)),
        tumour_voxels=int(voxels), tumour_ml=float(voxels * np.prod(image.spacing) / 1000.0),
        tumour_bbox=bbox, foreground_points=foreground,
    )


def _parse_manifest(uri: str, data: bytes) -> dict[str, str]:
    reader = csv.reader(io.StringIO(data.decode("utf-8-sig")))
    header = [cell.strip() for cell in next(reader, [])]
    if header[:2] != ["case_id", "split"]:
        raise ValueError(f"{uri}: first line is {header!r}; expected the header 'case_id,split'")
    splits = {}
    for line_number, row in enumerate(reader, start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2 or row[1].strip() not in SPLITS:
            raise ValueError(f"{uri} line {line_number}: {row!r}; expected "
                             f"'case_id,split' with split one of {', '.join(SPLITS)}")
        splits[row[0].strip()] = row[1].strip()
    return splits


def assign_splits(cases: list[Case], seed: int, fractions=DEFAULT_SPLIT_FRACTIONS) -> None:
    """Seeded patient-level split of the usable cases: one patient's cases share a split."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions {fractions} must be three non-negative numbers summing to 1")
    usable = [case for case in cases if case.status == "ok"]
    groups: dict[str, list[Case]] = {}
    for case in sorted(usable, key=lambda c: c.case_id):
        groups.setdefault(case.patient_group or case.case_id, []).append(case)
    keys = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    train, val = round(fractions[0] * len(usable)), round(fractions[1] * len(usable))
    targets = np.asarray([train, val, len(usable) - train - val])
    counts = np.zeros(3, dtype=int)
    for position in order:
        members = groups[keys[position]]
        slot = int(np.argmax(targets - counts))  # the split furthest below its target
        counts[slot] += len(members)
        for case in members:
            case.split = SPLITS[slot]


def build_catalog(uri: str, *, index_uri: str | None = None, seed: int = 0,
                  split_fractions=DEFAULT_SPLIT_FRACTIONS, exclude_empty_masks: bool = True,
                  refresh_index: bool = False, trust_index: bool = False) -> Catalog:
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

    Raises:
        ValueError: ``uri`` is not an S3 prefix, holds no case folder, or the manifest is malformed.
        s3io.S3Error: the bucket cannot be listed.
    """
    bucket, prefix = s3io.parse_uri(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    uri = f"s3://{bucket}/{prefix}"
    index_uri = index_uri or _index_uri_for(uri)
    started = time.perf_counter()
    index = HeaderIndex() if refresh_index else _load_index(index_uri)
    manifest_uri = uri + MANIFEST_NAME
    if trust_index and index.objects:
        listing = [s3io.ObjectInfo(obj.key, obj.size, obj.etag) for obj in index.objects.values()]
        manifest_bytes = s3io.read_uri(manifest_uri)
        logger.info("using the saved index %s (%d objects) without listing %s", index_uri, len(listing), uri)
    else:
        listing = s3io.list_tree(bucket, prefix)
        manifest_bytes = None
    grouped, manifest_info, ignored = _group_objects(prefix, listing)
    if manifest_info is not None:
        manifest_bytes = s3io.get_object(bucket, manifest_info.key)
    if not grouped:
        raise ValueError(f"no case folders under {uri}: expected <case_id>/image/*.dcm and "
                         f"<case_id>/mask/*.dcm ({len(listing)} objects listed)")
    if ignored:
        logger.info("ignored %d object(s) outside <case>/image/ and <case>/mask/", ignored)

    objects: dict[str, IndexedObject] = {}
    to_read = []
    for info in (i for parts in grouped.values() for series in parts.values() for i in series):
        saved = index.objects.get(info.key)
        if saved is not None and saved.etag == info.etag and saved.size == info.size:
            objects[info.key] = saved
        else:
            to_read.append(info)
    read_started = time.perf_counter()
    for indexed in s3io.executor().map(lambda info: read_header(bucket, info), to_read):
        objects[indexed.key] = indexed
    read_seconds = time.perf_counter() - read_started

    cases = []
    for case_id in sorted(grouped):
        case = Case(case_id)
        parts = {folder: [objects[info.key] for info in sorted(grouped[case_id][folder], key=lambda o: o.key)]
                 for folder in ("image", "mask")}
        try:
            case.image = assemble_series(bucket, "image", parts["image"])
            case.mask = assemble_series(bucket, "mask", parts["mask"])
            check_pair(case.image, case.mask)
        except QualityError as err:
            case.exclude(str(err))
        hashes = {h.patient_hash for h in (case.image.headers if case.image else ()) if h.patient_hash}
        case.patient_group = min(hashes) if hashes else ""
        cases.append(case)

    summaries: dict[str, tuple[str, CaseSummary]] = {}
    pending = []
    for case in cases:
        if case.status != "ok":
            continue
        case_fingerprint = _objects_fingerprint(grouped[case.case_id]["image"] + grouped[case.case_id]["mask"])
        saved = index.cases.get(case.case_id)
        if saved is not None and saved[0] == case_fingerprint:
            summaries[case.case_id] = saved
        else:
            pending.append((case, case_fingerprint))
    with ThreadPoolExecutor(CASE_WORKERS, thread_name_prefix="case-summary") as pool:
        futures = [(case, case_fingerprint, pool.submit(summarise_case, case.case_id, case.image, case.mask))
                   for case, case_fingerprint in pending]
        for case, case_fingerprint, future in futures:
            try:
                summaries[case.case_id] = (case_fingerprint, future.result())
            except (s3io.S3Error, ValueError) as err:
                case.exclude(f"pixel data unreadable: {err}")
    for case in cases:
        if case.status == "ok":
            case.summary = summaries[case.case_id][1]
            if exclude_empty_masks and case.summary.tumour_voxels == 0:
                case.exclude("mask is empty (no tumour voxels); label it or pass exclude_empty_masks=False")

    _exclude_cross_case_duplicates(cases)
    if manifest_bytes is not None:
        manifest = _parse_manifest(manifest_uri, manifest_bytes)
        unknown = sorted(set(manifest) - {case.case_id for case in cases})
        if unknown:
            logger.warning("manifest.csv lists %d case(s) not found under %s: %s", len(unknown), uri,
                           ", ".join(unknown[:5]))
        for case in cases:
            if case.status != "ok":
                continue
            if case.case_id in manifest:
                case.split = manifest[case.case_id]
            else:
                case.exclude("not listed in manifest.csv")
    else:
        assign_splits(cases, seed, split_fractions)

    if to_read or pending or objects.keys() != index.objects.keys():
        _save_index(index_uri, HeaderIndex(objects, summaries))
    # What training reads: the case objects and the manifest.
    fingerprint = _objects_fingerprint((i for parts in grouped.values() for series in parts.values() for i in series),
                                       manifest_bytes or b"")[:16]
    stats = {
        "objects": sum(len(s) for parts in grouped.values() for s in parts.values()),
        "headers_read": len(to_read),
        "headers_reused": len(objects) - len(to_read),
        "header_seconds": round(read_seconds, 3),
        "headers_per_s": round(len(to_read) / read_seconds, 1) if to_read and read_seconds > 0 else None,
        "cases_summarised": len(pending),
        "seconds": round(time.perf_counter() - started, 3),
    }
    catalog = Catalog(uri=uri, cases=cases, fingerprint=fingerprint, index_stats=stats)
    for case in catalog.excluded():
        logger.warning("case %s excluded: %s", case.case_id, case.reason)
    logger.info("catalog %s: %d cases, %d usable (train %d, val %d, test %d), %d excluded; %s",
                uri, len(cases), len(cases) - len(catalog.excluded()), len(catalog.split("train")),
                len(catalog.split("val")), len(catalog.split("test")), len(catalog.excluded()), stats)
    return catalog


def _exclude_cross_case_duplicates(cases: list[Case]) -> None:
    """A case whose image objects repeat another case's (same content or same SOP instance)."""
    seen: dict[str, str] = {}
    for case in cases:
        if case.image is None:
            continue
        marks = {f"etag:{etag}" for etag in case.image.etags}
        marks |= {f"sop:{header.sop_uid}" for header in case.image.headers if header.sop_uid}
        first = sorted({seen[mark] for mark in marks if mark in seen})
        if first and case.status == "ok":
            case.exclude(f"image objects duplicate those of case {first[0]} (copied or "
                         "mislabelled patient folder)")
        for mark in marks:
            seen.setdefault(mark, case.case_id)
