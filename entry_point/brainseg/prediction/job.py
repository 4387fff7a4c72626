"""The prediction job: every case under a data prefix (this shard's share) through the region reader,
the ensemble and back to S3 as DICOM SEG and/or NIfTI and volumes (layout in :mod:`brainseg.prediction.options`).

The next case's channels and source headers are read while the current one is inferred. A case
that cannot be read, predicted or written is reported with the reason and skipped; the batch goes
on. A case's ``volumes.csv`` is written after its SEG, and ``complete.json`` after every shard's
rows, so a partial output never looks complete; a rerun skips the cases already complete.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from brainseg.data.catalog import Case, build_catalog
from brainseg.data.geometry import Aligned, labels_onto
from brainseg.data.identify import load_rules
from brainseg.data.resample import TargetSpacing
from brainseg.data.series import Series
from brainseg.data.stream import read_case_region
from brainseg.detection import Threshold, largest_component_ml_of
from brainseg.dicom.seg import Algorithm, encode_segmentation
from brainseg.environment import Environment
from brainseg.io import s3
from brainseg.io.store import Store
from brainseg.labels import LabelScheme, parse_roi_labels
from brainseg.layout import PredictionLayout
from brainseg.metrics import score_structures
from brainseg.model.artifact import load_model
from brainseg.model.description import ModelDescription
from brainseg.prediction.nifti import label_map_bytes
from brainseg.prediction.options import PredictOptions, parse_shard
from brainseg.prediction.predictor import Prediction, Predictor, pooled_choices
from brainseg.progress import Progress
from brainseg.stream_config import FLOAT_BYTES

logger = logging.getLogger(__name__)
LOG_SECONDS = 30.0  # without a terminal, a progress line at most this often


class PredictionError(ValueError):
    """A job that cannot start: bad data prefix, models or options (nothing predicted)."""


@dataclass
class LoadedCase:
    channels: list  # raw (modality units) (D, H, W) per sequence
    mask: np.ndarray | None
    seg_on: Series | Aligned  # what the SEG is drawn on (seg_volume)
    headers: list  # its series' object headers, for the SEG


def case_memory_bytes(case: Case, predictor: Predictor) -> int:
    """An upper estimate of what predicting ``case`` holds: its raw and normalised channels, the
    mask, each model's resampled input and output, and the averaged probabilities."""
    native = int(np.prod(case.image.shape))
    channels, outputs = case.channels, predictor.scheme.out_channels
    largest = max(int(np.prod(TargetSpacing(m.description.target_spacing).grid_of(case).shape))
                  for m in predictor.models)
    return FLOAT_BYTES * (native * (2 * channels + 3 * outputs + 1) + largest * (channels + 2 * outputs))


def algorithm_of(description: ModelDescription) -> Algorithm:
    """How a SEG names the model that made it: the network, the run and the code version."""
    return Algorithm(f"brainseg {description.network.get('name', 'network')}",
                     f"{description.run_name or 'model'} {description.code_version}".strip()[:64])


def seg_volume(case: Case, sequence: str) -> Series | Aligned:
    """What a case's SEG is drawn on: the sequence ``sequence`` as the case reads it (the first
    sequence present when ``sequence`` is empty or zero-filled in this case)."""
    names = [stats.sequence for stats in case.summary.intensities]
    chosen = case.images[names.index(sequence)] if sequence in names else None
    return case.image if chosen is None else chosen


def seg_of(case: Case, prediction: Prediction, on: Series | Aligned, headers: list, scheme: LabelScheme,
           algorithm: Algorithm) -> bytes:
    """The prediction as a DICOM SEG on the series of ``on`` (:func:`seg_volume`; ``headers``: its
    objects' headers): a series on a grid of its own, or in a frame registered to the reference's,
    gets the masks on its own voxels (nearest voxel)."""
    series, masks = on.native, prediction.masks
    if isinstance(on, Aligned):
        masks = [labels_onto(mask, case.image, series, on.registration) for mask in masks]
    return encode_segmentation(headers, series.planes, masks, list(scheme.names), algorithm)


def nifti_of(case: Case, prediction: Prediction, scheme: LabelScheme) -> bytes:
    """The prediction as a label map in the training label values, NIfTI on the first sequence's grid."""
    image = case.image
    return label_map_bytes(scheme.label_map(prediction.masks), image.spacing, image.origin, image.orientation)


def volume_row(case: Case, prediction: Prediction, structures: tuple, mask: np.ndarray | None,
               seconds: float, detection: Threshold = Threshold()) -> dict:
    """A case's line of ``volumes.csv``: predicted voxels and ml per structure (:class:`brainseg.labels.Structure`),
    the study's detection score and call at ``detection`` (:mod:`brainseg.detection`), and Dice,
    IoU, HD95 (mm) and the mask's ml when there is a mask."""
    names = [structure.name for structure in structures]
    voxel_ml = float(np.prod(case.image.spacing)) / 1000.0
    row = {"case_id": case.case_id, "status": "predicted", "shape": "x".join(map(str, case.image.shape)),
           "spacing_mm": "x".join(f"{v:g}" for v in case.image.spacing), "voxel_ml": voxel_ml}
    for name, predicted in zip(names, prediction.masks):
        voxels = int(predicted.sum())
        row[f"voxels_{name}"] = voxels
        row[f"predicted_ml_{name}"] = round(voxels * voxel_ml, 6)
    score = largest_component_ml_of(prediction.masks, case.image.spacing)
    row.update(tumour_score_ml=round(score, 4), tumour_present=int(detection.present(score)))
    if mask is not None:
        scores = score_structures(structures, prediction.masks, mask, case.image.spacing)
        for name in names:
            overlap = scores["overlaps"][name]
            row.update({f"truth_ml_{name}": round(overlap.truth * voxel_ml, 6), f"dice_{name}": round(overlap.dice, 6),
                        f"iou_{name}": round(overlap.iou, 6), f"hd95_{name}": round(scores["hd95"][name], 3)})
            lesions = scores["lesion_wise"][name]
            row.update({f"lesion_dice_{name}": round(lesions.dice, 6), f"lesion_hd95_{name}": round(lesions.hd95, 3),
                        f"lesions_{name}": lesions.lesions, f"false_positives_{name}": lesions.false_positives})
    row["seconds"] = round(seconds, 3)
    return row


def _csv_rows(data: bytes) -> list[dict]:
    return list(csv.DictReader(io.StringIO(data.decode())))


class PredictionJob:
    """One shard of a prediction job; :meth:`run` returns the number of cases per status."""

    def __init__(self, options: PredictOptions, env: Environment, device: torch.device):
        self.options = options
        self.device = device
        self.shard = parse_shard(options.shard) if options.shard else (
            env.hosts.index(env.current_host) if env.current_host in env.hosts else 0, len(env.hosts) or 1)
        self.store = Store(options.output_uri, "")

    def setup(self) -> None:
        options = self.options
        s3.check_bucket(options.output_uri)
        s3.check_bucket(options.data_uri)
        if options.precision == "fp16" and self.device.type != "cuda":
            raise PredictionError("precision fp16 needs a GPU; use bf16 or fp32 on CPU")
        try:
            models = [load_model(location, self.device) for location in options.model]
            rules, detection = pooled_choices(options.postprocessing) if options.postprocessing else (None, None)
            self.predictor = Predictor(models, self.device, mirror=options.mirror, sw_batch_size=options.sw_batch_size,
                                       overlap=None if options.sw_overlap < 0 else options.sw_overlap,
                                       precision=options.precision, postprocess=options.postprocess, rules=rules,
                                       detection=detection)
        except ValueError as err:
            raise PredictionError(str(err)) from err
        description = self.predictor.description
        if options.seg_series and options.seg_series not in description.sequences:
            raise PredictionError(f"--seg-series {options.seg_series!r}: the model reads "
                                  f"{', '.join(description.sequences)}; name one of them")
        self.algorithm = algorithm_of(models[0].description)
        index, count = self.shard
        if index == 0:  # a rerun's earlier results stop looking complete before anything else is written
            for relative in (PredictionLayout.COMPLETE, PredictionLayout.MERGED):
                s3.delete(self.store.url(relative))
            self.store.put_json(PredictionLayout.SETTINGS, {
                "options": options.to_dict(), "shards": count, "started": time.time(),
                "models": [{"source": m.source, **m.description.to_dict()} for m in models]})
        s3.delete(self.store.url(PredictionLayout.shard(index, count)))
        try:
            self.catalog = build_catalog(options.data_uri, index_uri=options.index_uri or None, require_masks=False,
                                         exclude_empty_masks=False, max_header_bytes=options.max_header_mb * 2**20,
                                         sequences=description.sequences,
                                         zero_fill=description.missing_sequences == "zero",
                                         identity_key_uri=options.identity_key_uri,
                                         roi_labels=parse_roi_labels(options.roi_labels), layout=options.layout, case_per=options.case_per,
                                         sequence_rules=load_rules(options.sequence_rules),
                                         registration=options.registration)
        except ValueError as err:
            raise PredictionError(str(err)) from err

    def work(self) -> list:
        """This shard's cases and exclusions, by case ID."""
        everything = sorted([*self.catalog.cases, *self.catalog.exclusions], key=lambda item: item.case_id)
        if self.options.cases:
            known = {item.case_id for item in everything}
            unknown = sorted(set(self.options.cases) - known)
            if unknown:
                raise PredictionError(f"cases {', '.join(unknown)}: no such case folder under {self.options.data_uri}")
            everything = [item for item in everything if item.case_id in self.options.cases]
        index, count = self.shard
        return everything[index::count]

    def load(self, case: Case) -> LoadedCase:
        depth, rows, columns = case.image.shape
        channels, mask = read_case_region(case, (0, depth, 0, rows, 0, columns), with_mask=case.mask is not None)
        on = seg_volume(case, self.options.seg_series)
        if "seg" in self.options.output_format and self.options.seg_series in case.missing:
            logger.warning("case %s has no %s series (zero-filled): its SEG is drawn on the first sequence present",
                           case.case_id, self.options.seg_series)
        return LoadedCase(channels, mask, on, on.native.read_headers() if "seg" in self.options.output_format else [])

    def predict(self, case: Case, loaded: LoadedCase, started: float) -> dict:
        prediction = self.predictor.predict(loaded.channels, case.summary.intensities, case.image.spacing)
        scheme = self.predictor.scheme
        if "seg" in self.options.output_format:
            self.store.put(PredictionLayout.segmentation(case.case_id),
                           seg_of(case, prediction, loaded.seg_on, loaded.headers, scheme, self.algorithm), "application/dicom")
        if "nifti" in self.options.output_format:
            self.store.put(PredictionLayout.nifti(case.case_id), nifti_of(case, prediction, scheme), "application/gzip")
        row = volume_row(case, prediction, self.predictor.scheme.structures, loaded.mask,
                         time.perf_counter() - started, self.predictor.detection)
        self.store.put_csv(PredictionLayout.volumes(case.case_id), [row])
        return row

    def _finished_before(self, case_id: str) -> dict | None:
        if self.options.overwrite:
            return None
        data = s3.read_uri(self.store.url(PredictionLayout.volumes(case_id)))
        rows = _csv_rows(data) if data else []
        return rows[0] if rows else None

    def run(self) -> dict:
        """Predict this shard's cases; ``{status: cases}``.

        Raises:
            PredictionError: the job cannot start.
            s3.S3Error: the output cannot be written (after retries).
        """
        self.setup()
        work = self.work()
        cases = [item for item in work if isinstance(item, Case)]
        rows = [{"case_id": item.case_id, "status": "excluded", "reason": item.reason}
                for item in work if not isinstance(item, Case)]
        for row in rows:
            logger.warning("case %s not predicted: %s", row["case_id"], row["reason"])
        found = s3.executor().map(self._finished_before, [case.case_id for case in cases])  # concurrently
        earlier = {case.case_id: row for case, row in zip(cases, found) if row}
        if earlier:
            logger.info("%d case(s) already complete under %s (kept; --overwrite true predicts them again)",
                        len(earlier), self.options.output_uri)
        rows += earlier.values()
        todo = [case for case in cases if case.case_id not in earlier]
        budget = self.options.memory_budget_mb * 2**20
        progress = Progress(len(todo), phase="predict", unit="case", log_seconds=LOG_SECONDS)
        with progress, ThreadPoolExecutor(1, thread_name_prefix="case-read") as reader:
            def submit(number: int):
                if number >= len(todo):
                    return None
                needed = case_memory_bytes(todo[number], self.predictor)
                if needed > budget:
                    return f"needs about {needed / 2**20:.0f} MiB, more than --memory-budget-mb {budget // 2**20}"
                return reader.submit(self.load, todo[number])

            upcoming = submit(0)
            for number, case in enumerate(todo):
                started = time.perf_counter()
                loading, upcoming = upcoming, submit(number + 1)
                try:
                    if isinstance(loading, str):
                        raise ValueError(loading)
                    rows.append(self.predict(case, loading.result(), started))
                except Exception as err:  # one bad case never ends the batch; the reason is kept
                    reason = f"{type(err).__name__}: {err}"[:500]
                    logger.warning("case %s skipped: %s", case.case_id, reason)
                    rows.append({"case_id": case.case_id, "status": "skipped", "reason": reason})
                progress.update(number + 1)
        rows.sort(key=lambda row: row["case_id"])
        self.finish(rows)
        counts = dict(Counter(row["status"] for row in rows))
        logger.info("shard %d/%d: %s; outputs under %s", *self.shard,
                    ", ".join(f"{count} {status}" for status, count in sorted(counts.items())) or "no cases",
                    self.options.output_uri)
        return counts

    def finish(self, rows: list[dict]) -> None:
        """Write this shard's rows; the shard that finds every shard's rows merges them and marks
        the output complete (last)."""
        index, count = self.shard
        self.store.put_csv(PredictionLayout.shard(index, count), rows)
        shards = [s3.read_uri(self.store.url(PredictionLayout.shard(k, count))) for k in range(count)]
        if any(data is None for data in shards):
            logger.info("shard %d/%d done; the last shard to finish writes %s", index, count, PredictionLayout.COMPLETE)
            return
        merged = sorted((row for data in shards for row in _csv_rows(data)), key=lambda row: row["case_id"])
        self.store.put_csv(PredictionLayout.MERGED, merged)
        counts = Counter(row["status"] for row in merged)
        self.store.put_json(PredictionLayout.COMPLETE, {"cases": len(merged), **counts, "shards": count,
                                                        "finished": time.time()})

