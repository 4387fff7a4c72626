"""Step 1 of the catalog: what a dataset prefix holds, case by case (:func:`list_cases`), and
where its header index may live (:func:`check_index_location`).

Two layouts: ``folders`` (``<case>/<sequence>/…`` and ``<case>/mask/…``) and ``studies`` (any tree
of objects, grouped into studies by their headers once they are indexed:
:mod:`brainseg.data.studies`); ``auto`` takes ``folders`` when any object sits in a sequence or mask
folder of a case, else ``studies``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from brainseg.data.index import HeaderIndex
from brainseg.io import s3

logger = logging.getLogger(__name__)

INDEX_DIR = ".brainseg"
MANIFEST_NAME = "manifest.csv"
LAYOUTS = ("folders", "studies", "auto")


def index_uri_for(uri: str) -> str:
    return uri.rstrip("/") + f"/{INDEX_DIR}/index.jsonl"


def check_index_location(uri: str, index_uri: str) -> None:
    """Inside the dataset an index may live only under ``<data>/.brainseg/``, never in a case folder.

    Raises:
        ValueError: ``index_uri`` lies elsewhere inside the data prefix.
    """
    if index_uri.startswith(uri) and not index_uri.startswith(uri + INDEX_DIR + "/"):
        raise ValueError(f"index_uri {index_uri} is inside the dataset {uri} but not under its {INDEX_DIR}/ "
                         f"folder; it would be listed as data (or overwrite it). Use {index_uri_for(uri)} "
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


@dataclass(frozen=True)
class Listing:
    """What the dataset prefix holds: ``grouped`` ``{case_id: {folder: [objects]}}`` for the sequence
    and mask folders, the other folders of each case, and the manifest's bytes (``None``: none)."""

    uri: str
    bucket: str
    sequences: tuple
    grouped: dict
    other_folders: dict
    manifest: bytes | None
    layout: str = "folders"
    loose: tuple = ()  # the studies layout before discovery: every object, not yet grouped

    @property
    def folders(self) -> tuple:
        return self.sequences + ("mask",)

    @property
    def objects(self) -> list[s3.ObjectInfo]:
        return [info for parts in self.grouped.values() for series in parts.values() for info in series] + list(self.loose)


def list_cases(uri: str, sequences: tuple, index: HeaderIndex, trusted_index_uri: str | None = None,
               layout: str = "folders") -> Listing:
    """Step 1, list: the case folders under ``uri`` (from the saved index without listing, when
    ``trusted_index_uri`` names one that holds objects), or, in the ``studies`` layout, every
    object under it, loose.

    Raises:
        ValueError: an unknown layout; no case folder (``folders``), with a hint when the cases are one
            level up or down; no object at all (``studies``).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    bucket, prefix = s3.parse_uri(uri)
    manifest = None
    if trusted_index_uri and index.objects:
        listing = [s3.ObjectInfo(obj.key, obj.size, obj.etag) for obj in index.objects.values()]
        manifest = s3.read_uri(uri + MANIFEST_NAME)
        logger.info("using the saved index %s (%d objects) without listing %s", trusted_index_uri, len(listing), uri)
    else:
        listing = s3.list_tree(bucket, prefix)
    folders = sequences + ("mask",)
    grouped, manifest_info, ignored, other_folders = _group_objects(prefix, listing, folders)
    if manifest_info is not None:
        manifest = s3.get_object(bucket, manifest_info.key)
    found_folders = any(series for parts in grouped.values() for series in parts.values())
    if layout == "studies" or (layout == "auto" and not found_folders):
        loose = tuple(info for info in listing if not info.key.endswith("/") and info.key[len(prefix):] != MANIFEST_NAME
                      and not info.key[len(prefix):].startswith(INDEX_DIR + "/"))
        if not loose:
            raise ValueError(f"no objects under {uri} ({len(listing)} listed)")
        return Listing(uri, bucket, sequences, {}, {}, manifest, "studies", loose)
    if not any(series for parts in grouped.values() for series in parts.values()):
        raise ValueError(f"no case folders under {uri}: expected <case_id>/{{{','.join(sequences)}}}/*.dcm and "
                         f"<case_id>/mask/*.dcm ({len(listing)} objects listed)"
                         f"{_layout_hint(uri, listing, prefix, folders)}")
    if ignored:
        logger.info("ignored %d object(s) outside <case>/{%s}/", ignored, ",".join(folders))
    return Listing(uri, bucket, sequences, grouped, other_folders, manifest)
