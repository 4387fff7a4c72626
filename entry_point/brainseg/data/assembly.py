"""Step 3 of the catalog, assemble: each case's sequences and mask as checked series on one grid.

The first present sequence is the reference; every other sequence is placed on its grid
(:func:`brainseg.data.quality.place`: as it is, read through its own geometry, or registered when
it lies in another frame of reference), and the mask is a label series, a DICOM SEG
(:mod:`brainseg.data.segmentation`) or an RT Structure Set (:mod:`brainseg.data.contours`) placed
the same way. A case that fails a check gets its reason, never the catalog.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from brainseg.data.contours import ContourMask, ContourOptions, is_structure_set, read_structure_set
from brainseg.data.listing import Listing
from brainseg.data.quality import QualityError, assemble_series, place
from brainseg.data.registration import Registrar
from brainseg.data.segmentation import SegmentationMask, place_segmentation
from brainseg.data.series import Series

logger = logging.getLogger("brainseg.data.catalog")  # the catalog's log: these lines are its steps'


@dataclass(frozen=True)
class Assembled:
    """Each case's checked series ``{case_id: ({sequence: Series | None}, mask)}``, its skipped
    non-image objects and zero-filled sequences, and the reasons of those that failed (first pass)."""

    series: dict
    skipped: dict
    missing: dict
    reasons: dict


def assemble_cases(listed: Listing, objects: dict, zero_fill: bool, require_masks: bool,
                   contours: ContourOptions = ContourOptions(), registrar: Registrar | None = None) -> Assembled:
    """Step 3, assemble: every case's sequences and mask as checked series on one grid
    (:func:`assemble_case`; sequences in other frames of reference registered by ``registrar``); a
    case that fails is given its reason."""
    series, skipped, missing, reasons = {}, {}, {}, {}
    for case_id in sorted(listed.grouped):
        parts = {folder: [objects[info.key] for info in sorted(listed.grouped[case_id][folder], key=lambda o: o.key)]
                 for folder in listed.folders}
        skipped[case_id] = tuple(f"{folder}/{obj.name}: {obj.error}" for folder in listed.folders
                                 for obj in parts[folder] if obj.stray and not (folder == "mask" and is_structure_set(obj)))
        try:
            series[case_id] = assemble_case(listed.bucket, listed.sequences, parts, zero_fill, require_masks,
                                            sorted(listed.other_folders.get(case_id, ())), contours, registrar)
            missing[case_id] = tuple(name for name, item in series[case_id][0].items() if item is None)
            mask = series[case_id][1]
            for note in getattr(mask.native, "notes", ()) if mask is not None else ():
                logger.warning("case %s: %s", case_id, note)
        except QualityError as err:
            reasons[case_id] = str(err)
    return Assembled(series, skipped, missing, reasons)


def read_structure_sets(bucket: str, objects: dict, identity_key: bytes) -> dict:
    """The RT Structure Sets among ``objects``, parsed, by key (one that cannot be read is a warning
    naming the object, and left out)."""
    found = {}
    for key, obj in objects.items():
        if is_structure_set(obj):
            try:
                found[key] = read_structure_set(bucket, obj, identity_key)
            except QualityError as err:
                logger.warning("studies layout: %s; left out", err)
    return found


def assemble_case(bucket: str, sequences: tuple, parts: dict, zero_fill: bool, require_masks: bool,
                  other_folders: list[str], contours: ContourOptions = ContourOptions(),
                  registrar: Registrar | None = None
                  ) -> tuple[dict[str, Series | None], Series | SegmentationMask | ContourMask | None]:
    """Each sequence's series (``None`` when absent and ``zero_fill``) and the mask, on the first
    present sequence's grid (:func:`~brainseg.data.quality.place`; a sequence in another frame of
    reference registered by ``registrar``).

    Raises:
        QualityError: a sequence or the mask fails its checks, is absent (without ``zero_fill``),
            or lies on another grid than the first sequence present without a shared frame of
            reference or a registration that passes its check.
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
    images = {name: place(reference, item, name, reference_name, registrar=registrar)
              if item is not None and name != reference_name
              else item for name, item in images.items()}
    mask = None
    others = {name: item for name, item in images.items() if item is not None and name != reference_name}
    segmentations = [obj for obj in parts["mask"] if obj.header is not None and obj.header.is_segmentation]
    structure_sets = [obj for obj in parts["mask"] if is_structure_set(obj)]
    if structure_sets:
        extra = [obj for obj in parts["mask"] if not obj.stray or obj in structure_sets[1:]]
        if extra:
            raise QualityError(f"mask/ holds an RT Structure Set ({structure_sets[0].name}) and {len(extra)} other "
                               "object(s); keep one structure set, SEG or label series per mask folder")
        mask = ContourMask.read(bucket, structure_sets[0], reference, reference_name, contours.roi_labels,
                                contours.identity_key, others, contours.show_names)
    elif segmentations:
        extra = [obj for obj in parts["mask"] if not obj.stray and obj not in segmentations]
        if len(segmentations) > 1 or extra:
            raise QualityError(f"mask/ holds a DICOM SEG ({segmentations[0].name}) and {len(segmentations) + len(extra) - 1} other "
                               "image object(s); keep one SEG object, or a label series, per mask folder")
        mask = place_segmentation(bucket, segmentations[0], reference, reference_name, others)
    elif parts["mask"] or require_masks:
        mask = place(reference, assemble_series(bucket, "mask", parts["mask"]), "mask", reference_name, labels=True)
    return images, mask
