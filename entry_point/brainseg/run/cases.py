"""The cases a run trains, validates and tests on: the catalog (built once, by rank 0 first) and
the three splits, checked against what the run needs."""

from __future__ import annotations

import gc
import logging

import numpy as np
import torch
from torch.utils.data import DataLoader

from brainseg.config import Hyperparameters
from brainseg.data.catalog import Case, Catalog, build_catalog
from brainseg.data.identify import load_rules
from brainseg.data.memory import load_in_memory
from brainseg.data.resample import NATIVE, TargetSpacing, median_spacing
from brainseg.data.splits import DEFAULT_SPLIT_FRACTIONS, SPLITS, assign_folds
from brainseg.data.stream import PatchStream
from brainseg.dicom import PixelDataError
from brainseg.labels import parse_roi_labels
from brainseg.run import distributed
from brainseg.run.errors import TrainingError
from brainseg.tasks import task_of

logger = logging.getLogger("brainseg.train")


def load_catalog(hp: Hyperparameters) -> Catalog:
    """The dataset catalog; rank 0 indexes first so the other ranks reuse its index."""
    def build() -> Catalog:
        try:
            return build_catalog(hp.data_uri, index_uri=hp.index_uri or None, seed=hp.seed,
                                 refresh_index=hp.refresh_index and distributed.is_main(),
                                 trust_index=hp.trust_index, require_masks=task_of(hp).needs_masks,
                                 max_header_bytes=hp.max_header_mb * 2**20, sequences=hp.sequence_names,
                                 zero_fill=hp.missing_sequences == "zero",
                                 exclude_empty_masks=hp.empty_masks == "exclude", labels=hp.label_scheme, identity_key_uri=hp.identity_key_uri,
                                 roi_labels=parse_roi_labels(hp.roi_labels), layout=hp.layout, case_per=hp.case_per,
                                 sequence_rules=load_rules(hp.sequence_rules), registration=hp.registration)
        except ValueError as err:  # the data prefix's layout, the manifest, the index location
            raise TrainingError(str(err)) from err
    catalog = build() if distributed.is_main() else None
    distributed.barrier()
    return catalog if catalog is not None else build()


def case_splits(hp: Hyperparameters, catalog: Catalog) -> dict[str, str]:
    """``{case_id: split}`` of the run: the catalog's, or with ``--fold K`` its test cases held out
    and its training and validation cases dealt into ``--folds`` patient-level folds (seeded by
    ``--seed``, studies with tumour and tumour-free ones dealt each on their own), fold K
    validating and the others training."""
    splits = {case.case_id: case.split for case in catalog.cases}
    if hp.fold < 0:
        return splits
    pool = {case.case_id: case.patient_group for case in catalog.cases if case.split != "test"}
    strata = {case.case_id: "tumour" if case.summary.tumour_voxels else "tumour-free" for case in catalog.cases}
    try:
        folds = assign_folds(pool, hp.folds, hp.seed, strata)
    except ValueError as err:
        raise TrainingError(str(err)) from err
    splits.update((case_id, "val" if fold == hp.fold else "train") for case_id, fold in folds.items())
    return splits


def select_cases(hp: Hyperparameters, catalog: Catalog, splits: dict[str, str]
                 ) -> tuple[list[Case], list[Case], list[Case]]:
    """Train, validation and test cases by the run's ``splits`` (:func:`case_splits`), with
    ``--max-train-cases`` and ``--max-val-cases`` applied."""
    train, val, test = ([case for case in catalog.cases if splits[case.case_id] == name] for name in SPLITS)
    usable = len(catalog.cases)
    if not usable:
        raise TrainingError(f"no usable training cases under {hp.data_uri} ({len(catalog.exclusions)} cases, none "
                            f"usable); run `brainseg-inspect {hp.data_uri}` to see why")
    counts = f"train {len(train)}, val {len(val)}, test {len(test)}"
    if not catalog.manifest and not (train and val and test):
        split = "/".join(str(round(100 * fraction)) for fraction in DEFAULT_SPLIT_FRACTIONS)
        raise TrainingError(f"{usable} usable case(s) cannot fill a {split} train/val/test split ({counts}): add "
                            "cases, or fix the split in manifest.csv")
    if not train or not val:
        raise TrainingError(f"manifest.csv leaves no usable {'training' if not train else 'validation'} case "
                            f"({counts}); list some as '{'train' if not train else 'val'}'")
    if not test:
        logger.warning("manifest.csv lists no usable test case: the run ends without a test evaluation")
    if hp.max_train_cases:
        train = train[:hp.max_train_cases]
    if hp.max_val_cases:
        val = val[:hp.max_val_cases]
    return train, val, test


def resolve_target_spacing(hp: Hyperparameters, train: list[Case]) -> TargetSpacing:
    """The spacing the network sees: the training cases' median (per axis), the value given, or each
    case's own (``native``). Logged with how many cases it resamples."""
    chosen = hp.target_spacing_mm
    if chosen == "native":
        return NATIVE
    target = TargetSpacing(median_spacing(case.image.spacing for case in train) if chosen == "median" else chosen,
                           hp.resampling)
    grids = [target.grid_of(case) for case in train]
    moved = sum(not grid.identity for grid in grids)
    separate = sum(grid.nearest_axis is not None for grid in grids)
    logger.info("target spacing %s mm (%s): %d of %d training case(s) resampled, %d of them by nearest slice "
                "out of plane (%s)", "x".join(f"{v:.3g}" for v in target.spacing), hp.target_spacing, moved,
                len(train), separate, hp.resampling)
    return target


def check_patch_fits(hp: Hyperparameters, train: list[Case], target: TargetSpacing) -> None:
    """Some training volume, at the target spacing, must hold a whole patch."""
    shapes = [target.grid_of(case).shape for case in train]
    if not any(all(p <= s for p, s in zip(hp.patch_size, shape)) for shape in shapes):
        largest = max(shapes, key=lambda shape: int(np.prod(shape)))
        raise TrainingError(f"patch_size {hp.patch_size} is larger than every training volume (largest "
                            f"{largest} at the target spacing); lower --patch-size to fit inside the volumes")


def patch_loader(hp: Hyperparameters, train_cases: list[Case], target: TargetSpacing, start_batch: int, rank: int,
                 world: int, device: torch.device) -> DataLoader:
    """The training batches: the patch stream of ``train_cases`` from batch ``start_batch`` (a resumed
    run continues the uninterrupted run's sequence), in DataLoader workers."""
    try:
        cases = load_in_memory(train_cases) if hp.data_source == "memory" else train_cases
    except PixelDataError as err:
        raise TrainingError(f"--data-source memory needs every training volume whole: {err}") from err
    stream = PatchStream(cases, hp.stream_config(), start_batch=start_batch, batch_size=hp.batch_size,
                         rank=rank, world_size=world, target=target)
    # The catalog and everything else alive now, to the collector's permanent generation: a forked
    # worker's garbage collections then leave their pages shared with this process rather than
    # copying them (benchmarks/scale.py measures a worker's own memory with a catalog of 1,251 studies).
    gc.collect()
    gc.freeze()
    # Its own generator: creating the iterator must not draw from the global RNG, or a
    # resumed run's dropout masks would drift from an uninterrupted run's.
    return DataLoader(stream, batch_size=hp.batch_size, num_workers=hp.num_workers,
                      pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(hp.seed),
                      persistent_workers=hp.num_workers > 0, prefetch_factor=2 if hp.num_workers else None)
