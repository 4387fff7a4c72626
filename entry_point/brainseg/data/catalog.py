"""The catalog: every case under a dataset prefix, checked, summarised and split.

``build_catalog(uri)`` lists the prefix (or, trusting a saved index, does not), indexes the
headers it has not seen (:mod:`brainseg.data.index`), assembles and checks each case's sequence
series and mask (:mod:`brainseg.data.quality`: on the first sequence's voxel grid, the others read
through their own geometry where their grids differ, :mod:`brainseg.data.geometry`),
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

from brainseg.data.assembly import Assembled, assemble_cases, read_structure_sets
from brainseg.data.contours import ContourMask, ContourOptions
from brainseg.data.geometry import Aligned
from brainseg.data.identify import Rules, default_rules
from brainseg.data.index import (
    MAX_HEADER_BYTES,
    HeaderIndex,
    identity_key,
    is_stray_name,
    key_id,
    load_index,
    read_header,
    save_index,
    without_descriptions,
)
from brainseg.data.listing import MANIFEST_NAME, Listing, check_index_location, index_uri_for, list_cases
from brainseg.data.quality import (
    IndexedObject,
    cross_case_duplicates,
    label_problem,
)
from brainseg.data.registration import Registrar
from brainseg.data.segmentation import SegmentationMask
from brainseg.data.series import Series
from brainseg.data.splits import DEFAULT_SPLIT_FRACTIONS, SPLITS, assign_splits, parse_manifest
from brainseg.data.studies import Discovery, discover_studies
from brainseg.data.summary import SUMMARY_VERSION, CaseSummary, summarise_case
from brainseg.io import s3
from brainseg.labels import LabelScheme

logger = logging.getLogger(__name__)

CASE_WORKERS = 4  # cases summarised concurrently, each with its own concurrent range reads
LOW_COVERAGE = 0.9  # a sequence read through its geometry that sees less of the reference grid is warned about
IMAGE_ONLY = ("image",)  # the single-sequence layout: <case>/image/ and <case>/mask/


@dataclass(frozen=True)
class Case:
    """A usable case: one checked series per sequence (channel order; ``None`` for a zero-filled
    missing sequence, named in ``missing``), its mask, summary and split. ``skipped`` lists the
    non-image objects found in its series folders and why each was skipped."""

    case_id: str
    split: str
    images: tuple
    mask: Series | SegmentationMask | ContourMask | None
    summary: CaseSummary
    patient_group: str = ""
    skipped: tuple = ()
    missing: tuple = ()

    @property
    def image(self) -> Series:
        """The first sequence present: the voxel grid every channel and the mask share."""
        return next(series for series in self.images if series is not None)

    @property
    def channels(self) -> int:
        return len(self.images)

    @property
    def resampled(self) -> dict:
        """``{sequence or "mask": Aligned}``: what this case reads through its own geometry onto the
        reference grid (the first sequence's)."""
        names = [stats.sequence for stats in self.summary.intensities]
        volumes = {**dict(zip(names, self.images)), "mask": self.mask}
        return {name: volume for name, volume in volumes.items() if isinstance(volume, Aligned)}


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
    layout: str = "folders"
    discovery: Discovery | None = None  # the studies layout: which series became which sequence, and why

    def split(self, name: str) -> list[Case]:
        """The cases of one split (``"train"``, ``"val"`` or ``"test"``)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return [case for case in self.cases if case.split == name]


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def _objects_fingerprint(objects, extra: bytes = b"") -> str:
    """Hash of the keys and ETags of ``objects`` (any order) and ``extra`` bytes."""
    digest = hashlib.sha256(extra)
    for info in sorted(objects, key=lambda o: o.key):
        digest.update(f"{info.key}\0{info.etag}\0".encode())
    return digest.hexdigest()[:24]


def build_catalog(uri: str, *, index_uri: str | None = None, seed: int = 0,
                  split_fractions=DEFAULT_SPLIT_FRACTIONS, exclude_empty_masks: bool = False,
                  refresh_index: bool = False, trust_index: bool = False,
                  require_masks: bool = True, max_header_bytes: int = MAX_HEADER_BYTES,
                  sequences: tuple = IMAGE_ONLY, zero_fill: bool = False, labels: LabelScheme | None = None,
                  identity_key_uri: str = "", roi_labels: tuple = (), layout: str = "folders",
                  sequence_rules: Rules | None = None, registration: str = "rigid", case_per: str = "study",
                  show_roi_names: bool = False) -> Catalog:
    """Index, check, summarise and split every case under ``uri``, in named steps: list, index,
    assemble, summarise, check, exclude, split, save (each below, testable alone).

    Args:
        uri: the dataset prefix ``s3://bucket/prefix/`` (layout in docs/input-contract.md).
        index_uri: where the header index JSON lives (default ``<uri>/.brainseg/index.jsonl``);
            it is reused when present and rewritten when anything changed.
        seed: seed of the patient-level split (ignored when ``manifest.csv`` exists).
        split_fractions: train/val/test fractions of the seeded split.
        exclude_empty_masks: exclude cases whose mask has no tumour voxel; otherwise they are
            tumour-free studies (trained on as background, scored for detection), split evenly.
        refresh_index: ignore a saved index and read every header again.
        trust_index: start from a saved index without listing the prefix, so start-up costs the
            same whatever the dataset size. Objects changed since indexing fail at read time
            (every range carries the indexed ETag); cases added since are not seen. Without a
            saved index this lists the prefix as usual.
        require_masks: with ``False`` (self-supervised pretraining) a case without a ``mask/``
            folder is usable; its ``mask`` is ``None`` and its summary has no tumour.
        max_header_bytes: a header that does not end within this many bytes is refused.
        sequences: the sequence folders of a case, in channel order (``("image",)``: the
            single-sequence layout). The first present is the reference grid; a sequence or mask on
            another grid is read through its geometry when it shares the reference's frame of
            reference, else its case is excluded.
        zero_fill: a case lacking some (not all) sequences stays usable; the missing channels read
            as zeros and are listed in ``Case.missing``. Otherwise such a case is excluded.
        labels: when given, a case whose mask holds a label value none of its classes covers (or
            one above 255) is excluded, rather than having that value read as background.
        identity_key_uri: where the identity key of the hashes lives (:func:`brainseg.data.index.identity_key`;
            default beside the index).
        roi_labels: RTSTRUCT masks: ``((ROI name, label value), ...)`` in painting order
            (:func:`brainseg.labels.parse_roi_labels`; empty: every ROI as 1).
        show_roi_names: reasons may quote ROI names ``roi_labels`` does not give (brainseg-inspect,
            where the data owner looks); else those ROIs are named by their ROINumber.
        layout: ``folders`` (``<case>/<sequence>/``), ``studies`` (any tree of objects, cases found
            by their headers: :mod:`brainseg.data.studies`) or ``auto`` (folders when there are any).
        case_per: the studies layout's case: ``study`` or ``patient`` (every study of a patient
            one case; :func:`brainseg.data.studies.discover_studies`).
        sequence_rules: which series is which sequence in the studies layout (default: the shipped
            rules, :mod:`brainseg.data.identify`).
        registration: ``rigid``: a sequence in another frame of reference than the reference is
            registered to it (:mod:`brainseg.data.registration`; kept in the index); ``none``: its
            case is excluded.

    Raises:
        ValueError: ``uri`` is not an S3 prefix or holds no case folder (with a hint when the
            cases are one level up or down), ``case_per`` is ``patient`` outside the studies
            layout, the manifest is malformed, ``index_uri`` is in a case folder or holds something
            other than an index, or the identity key cannot be had.
        s3.S3Error: the bucket cannot be listed.
    """
    started = time.perf_counter()
    bucket, prefix = s3.parse_uri(uri)
    uri = f"s3://{bucket}/{prefix.rstrip('/') + '/' if prefix else ''}"
    index_uri = index_uri or index_uri_for(uri)
    check_index_location(uri, index_uri)
    key = identity_key(index_uri, identity_key_uri)
    index = load_index(index_uri, key_id(key), refresh=refresh_index)
    sequences = tuple(sequences)
    listed = list_cases(uri, sequences, index, index_uri if trust_index else None, layout)
    if case_per != "study" and listed.layout != "studies":
        raise ValueError(f"case_per {case_per!r}: cases are grouped by patient only in the studies layout, and "
                         f"{uri} was read as {listed.layout} (a case per folder); drop --case-per, or pass "
                         "--layout studies")
    descriptions = listed.layout == "studies"  # series descriptions are kept in the index only where they are used
    if descriptions and index.objects and not index.descriptions:
        logger.info("the header index at %s holds no series descriptions (it was built for the folders layout); "
                    "reading the headers again", index_uri)
        index = HeaderIndex(index.key_id)
    indexed = index_objects(listed, index, key, max_header_bytes, descriptions)
    objects_listed = len(listed.objects)
    discovery = None
    if listed.layout == "studies":
        listed, discovery = discover_studies(listed, indexed.objects, sequence_rules or default_rules(), zero_fill,
                                             read_structure_sets(listed.bucket, indexed.objects, key), case_per)
    registrar = Registrar(index.registrations, enabled=registration != "none")
    assembled = assemble_cases(listed, indexed.objects, zero_fill, require_masks,
                               ContourOptions(roi_labels, key, show_roi_names),
                               registrar)
    summaries, summarised, unreadable = summarise_cases(listed, assembled, index, roi_labels)
    reasons = {**(discovery.reasons if discovery else {}), **assembled.reasons, **unreadable}
    reasons.update(check_cases(assembled, summaries, reasons, labels, exclude_empty_masks and require_masks))
    reasons.update(exclude_duplicates(assembled, reasons))
    groups = patient_groups(assembled)
    strata = {case_id: "tumour" if summary.tumour_voxels else "tumour-free" for case_id, (_, summary) in summaries.items()}
    splits, unlisted = split_cases(listed, assembled, groups, reasons, seed, split_fractions, strata)
    reasons.update(unlisted)
    cases = tuple(Case(case_id, splits[case_id], tuple(assembled.series[case_id][0].values()),
                       assembled.series[case_id][1], summaries[case_id][1], groups[case_id],
                       assembled.skipped[case_id], assembled.missing[case_id]) for case_id in sorted(splits))
    exclusions = tuple(Exclusion(case_id, reasons[case_id], assembled.skipped.get(case_id, ()))
                       for case_id in sorted(reasons))
    if (indexed.read or summarised or indexed.objects.keys() != index.objects.keys()
            or registrar.kept().keys() != index.registrations.keys()):
        save_index(index_uri, HeaderIndex(index.key_id, indexed.objects, summaries, descriptions, registrar.kept()))
    stats = {"objects": objects_listed, "headers_read": indexed.read,
             "headers_reused": len(indexed.objects) - indexed.read, "header_seconds": round(indexed.seconds, 3),
             "headers_per_s": round(indexed.read / indexed.seconds, 1) if indexed.read and indexed.seconds > 0
             else None, "cases_summarised": summarised, "registrations_fitted": registrar.fitted, "seconds": round(time.perf_counter() - started, 3)}
    # What training reads: the case objects and the manifest.
    catalog = Catalog(uri=uri, cases=cases, exclusions=exclusions,
                      fingerprint=_objects_fingerprint(listed.objects, listed.manifest or b"")[:16], index_stats=stats,
                      manifest=listed.manifest is not None, layout=listed.layout, discovery=discovery)
    log_catalog(catalog, len(listed.grouped) + len(discovery.reasons if discovery else ()), assembled.skipped)
    return catalog


@dataclass(frozen=True)
class Indexed:
    """Every case object's header (``objects`` by key), how many were read and how long it took."""

    objects: dict
    read: int
    seconds: float


def index_objects(listed: Listing, index: HeaderIndex, key: bytes, max_header_bytes: int,
                  descriptions: bool = False) -> Indexed:
    """Step 2, index: each object's header, from the saved index when its ETag and size still
    match, else read by a bounded ranged GET (stray names are recorded, not read); the series
    descriptions kept only with ``descriptions`` (the studies layout)."""
    objects: dict[str, IndexedObject] = {}
    to_read = []
    for info in listed.objects:
        saved = index.objects.get(info.key)
        if saved is not None and saved.etag == info.etag and saved.size == info.size:
            objects[info.key] = saved if descriptions else without_descriptions(saved)
        else:
            to_read.append(info)

    def read(info: s3.ObjectInfo) -> IndexedObject:
        stray = is_stray_name(info.key)
        if stray:
            return IndexedObject(info.key, info.size, info.etag, None, stray, stray=True)
        indexed = read_header(listed.bucket, info, key, max_header_bytes)
        return indexed if descriptions else without_descriptions(indexed)

    started = time.perf_counter()
    for indexed in s3.executor().map(read, to_read):
        objects[indexed.key] = indexed
    return Indexed(objects, len(to_read), time.perf_counter() - started)


def summarise_cases(listed: Listing, assembled: Assembled, index: HeaderIndex,
                    roi_labels: tuple = ()) -> tuple[dict, int, dict]:
    """Step 4, summarise: ``({case_id: (fingerprint, CaseSummary)}, cases summarised now,
    {case_id: reason} of those whose pixels cannot be read)``; saved summaries of unchanged cases
    (same objects, sequences, ROI mapping and summary version) are reused, the others read concurrently."""
    summaries: dict[str, tuple[str, CaseSummary]] = {}
    unreadable: dict[str, str] = {}
    pending = []
    for case_id in assembled.series:
        if case_id in assembled.reasons:
            continue
        fingerprint = _objects_fingerprint([info for folder in listed.folders for info in listed.grouped[case_id][folder]],
                                           ",".join(listed.sequences).encode() + f"|summary {SUMMARY_VERSION}".encode()
                                           + (f"|rois {roi_labels}".encode() if roi_labels else b""))
        saved = index.cases.get(case_id)
        if saved is not None and saved[0] == fingerprint:
            summaries[case_id] = saved
        else:
            pending.append((case_id, fingerprint))
    with ThreadPoolExecutor(CASE_WORKERS, thread_name_prefix="case-summary") as pool:
        futures = [(case_id, fingerprint, pool.submit(summarise_case, case_id, *assembled.series[case_id]))
                   for case_id, fingerprint in pending]
        for case_id, fingerprint, future in futures:
            try:
                summaries[case_id] = (fingerprint, future.result())
            except (s3.S3Error, ValueError) as err:
                unreadable[case_id] = f"pixel data unreadable: {err}"
    return summaries, len(pending), unreadable


def check_cases(assembled: Assembled, summaries: dict, reasons: dict, labels: LabelScheme | None,
                exclude_empty_masks: bool) -> dict[str, str]:
    """Step 5, check: ``{case_id: reason}`` for the cases not excluded yet whose mask is empty (with
    ``exclude_empty_masks``) or holds a label value ``labels`` does not cover."""
    failed = {}
    for case_id in assembled.series:
        if case_id in reasons:
            continue
        summary = summaries[case_id][1]
        if exclude_empty_masks and summary.tumour_voxels == 0:
            failed[case_id] = "mask is empty (no tumour voxels); label it, or keep it as a tumour-free study with " \
                              "--empty-masks keep"
        elif labels is not None and summary.label_counts and (reason := label_problem(summary, labels)):
            failed[case_id] = reason
    return failed


def exclude_duplicates(assembled: Assembled, reasons: dict) -> dict[str, str]:
    """Step 6, exclude: ``{case_id: reason}`` for the cases whose image objects repeat an earlier
    case's (:func:`_cross_case_duplicates`), among those not excluded yet."""
    return cross_case_duplicates(_present_images(assembled), reasons)


def _present_images(assembled: Assembled) -> dict[str, list[Series]]:
    return {case_id: [item for item in images.values() if item is not None]
            for case_id, (images, _) in assembled.series.items()}


def patient_groups(assembled: Assembled) -> dict[str, str]:
    """``{case_id: patient group}``: the smallest PatientID hash of its images ("" when none), so the
    cases of one patient land in one split."""
    return {case_id: min(hashes) if (hashes := {h.patient_hash for item in items for h in item.headers
                                                if h.patient_hash}) else ""
            for case_id, items in _present_images(assembled).items()}


def split_cases(listed: Listing, assembled: Assembled, groups: dict, reasons: dict, seed: int,
                split_fractions, strata: dict | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """Step 7, split: ``({case_id: split}, {case_id: reason})``: the usable cases' splits from
    ``manifest.csv`` when the dataset has one (a case it does not list is excluded with that
    reason), else from a seeded patient-level shuffle, each of ``strata`` (``{case_id: stratum}``)
    split on its own."""
    if listed.manifest is None:
        return assign_splits({case_id: groups[case_id] for case_id in assembled.series if case_id not in reasons},
                             seed, split_fractions, strata), {}
    manifest_uri = listed.uri + MANIFEST_NAME
    manifest = {_nfc(name): split for name, split in parse_manifest(manifest_uri, listed.manifest).items()}
    unknown = sorted(set(manifest) - {_nfc(case_id) for case_id in listed.grouped})
    if unknown:
        logger.warning("manifest.csv lists %d case(s) not found under %s: %s", len(unknown), listed.uri,
                       ", ".join(unknown[:5]))
    unlisted = {case_id: "not listed in manifest.csv" for case_id in assembled.series
                if case_id not in reasons and _nfc(case_id) not in manifest}
    return ({case_id: manifest[_nfc(case_id)] for case_id in assembled.series
             if case_id not in reasons and case_id not in unlisted}, unlisted)


def log_catalog(catalog: Catalog, folders: int, skipped: dict) -> None:
    """The exclusions, zero-filled sequences, skipped objects and the counts, by case ID only."""
    for exclusion in catalog.exclusions:
        logger.warning("case %s excluded: %s", exclusion.case_id, exclusion.reason)
    for case in catalog.cases:
        if case.missing:
            logger.warning("case %s: sequence(s) %s missing, zero-filled", case.case_id, ", ".join(case.missing))
    if catalog.discovery is not None:
        logger.info("sequences found by their headers (studies: rule)%s", "".join(
            f"\n  {line}" for line in catalog.discovery.table()))
    resampled = [case for case in catalog.cases if case.resampled]
    for case in resampled:
        for name, volume in case.resampled.items():
            if volume.coverage() < LOW_COVERAGE:
                logger.warning("case %s: %s sees only %.0f %% of the reference grid; the rest reads as zeros",
                               case.case_id, name, 100 * volume.coverage())
    if resampled:
        logger.info("%d case(s) hold sequences or masks on grids of their own, read through their geometry onto "
                    "the first sequence's grid", len(resampled))
    for case_id, items in sorted(skipped.items()):
        if items:
            logger.warning("case %s: skipped %d non-image object(s): %s", case_id, len(items),
                           "; ".join(items[:3]) + (" ..." if len(items) > 3 else ""))
    healthy = [case.case_id for case in catalog.cases if case.mask is not None and not case.summary.tumour_voxels]
    if healthy:
        logger.info("%d case(s) have an empty mask, kept as tumour-free studies (--empty-masks exclude leaves them "
                    "out): %s", len(healthy), ", ".join(healthy[:10]) + (" ..." if len(healthy) > 10 else ""))
    logger.info("catalog %s: %d cases, %d usable (train %d, val %d, test %d), %d excluded; %s",
                catalog.uri, folders, len(catalog.cases), len(catalog.split("train")), len(catalog.split("val")),
                len(catalog.split("test")), len(catalog.exclusions), catalog.index_stats)
