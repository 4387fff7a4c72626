"""Whole-volume evaluation: read each case's sequences through the region reader, resample them to
the run's target spacing, sliding-window inference, the output mapped back to the native grid,
per-case overlap and HD95 per structure (segmentation) or reconstruction error (autoencoder).

The next case's volumes are read while the current one is inferred. Under torch.distributed each
rank evaluates its share of the cases and every rank receives all results.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from brainseg.config import Hyperparameters
from brainseg.data.catalog import Case
from brainseg.data.resample import NATIVE, TargetSpacing
from brainseg.data.stream import read_case_region
from brainseg.data.transforms import normalize
from brainseg.detection import SliceCounts, Threshold, detection_figures, largest_component_ml, threshold_of
from brainseg.dicom import PixelDataError
from brainseg.model.inferer import sliding_window
from brainseg.overlap import Overlap, tumour_centre
from brainseg.postprocess import Choice, Offer, choose
from brainseg.progress import Progress
from brainseg.run import distributed
from brainseg.tasks import Task

logger = logging.getLogger(__name__)
EVAL_LOG_SECONDS = 30.0  # without a terminal, a progress line at most this often while evaluating


@dataclass(frozen=True)
class CaseResult:
    """One evaluated case. ``overlaps``, ``hd95`` (mm) and ``lesion_wise`` (BraTS's) per structure and
    ``tumour`` (all of them together) for segmentation, ``mse`` for
    the autoencoder; ``error`` when its pixels could not be decoded (then it counts in no figure)."""

    case_id: str
    shape: tuple
    seconds: float
    overlaps: dict | None = None
    hd95: dict | None = None
    lesion_wise: dict | None = None  # per structure, brainseg.metrics.LesionWise
    lesion_matches: dict | None = None  # per structure, brainseg.metrics.LesionMatch (chooses postprocessing)
    tumour: Overlap | None = None  # every structure as one: the volumes of the row
    slices: SliceCounts | None = None  # every structure as one, per slice of the case's grid
    voxel_ml: float = 0.0
    mse: float | None = None
    crop: dict | None = None  # image/mask/prediction around the tumour, for review overlays
    error: str = ""

    @property
    def dice(self) -> float:
        """Mean Dice over the structures."""
        return float(np.mean([overlap.dice for overlap in self.overlaps.values()]))

    @property
    def has_tumour(self) -> bool:
        return self.tumour.truth > 0

    @property
    def tumour_score_ml(self) -> float:
        """The detection score (:mod:`brainseg.detection`) of the prediction as scored."""
        return largest_component_ml(self.lesion_matches)

    def row(self, detection: Threshold | None = None) -> dict:
        """The case's line of test_cases.csv: mean figures, then each structure's when there are
        several; with ``detection``, whether the study holds tumour, its score and the call."""
        row = {"case_id": self.case_id, "shape": "x".join(map(str, self.shape))}
        if self.error:
            return {**row, "error": self.error}
        if self.overlaps is not None:
            total = self.tumour
            row.update(dice=round(self.dice, 6),
                       iou=round(float(np.mean([o.iou for o in self.overlaps.values()])), 6),
                       hd95=round(float(np.mean(list(self.hd95.values()))), 3),
                       truth_ml=round(total.truth * self.voxel_ml, 3),
                       predicted_ml=round(total.predicted * self.voxel_ml, 3),
                       truth_voxels=total.truth, predicted_voxels=total.predicted,
                       intersection_voxels=total.intersection)
            if detection is not None:
                row.update(tumour_present=int(self.has_tumour), tumour_score_ml=round(self.tumour_score_ml, 4),
                           tumour_detected=int(detection.present(self.tumour_score_ml)),
                           slices_found=self.slices.found, slices_missed=self.slices.missed,
                           slices_false_alarm=self.slices.false_alarms)
            if self.lesion_wise:
                row.update(lesion_dice=round(float(np.mean([v.dice for v in self.lesion_wise.values()])), 6),
                           lesion_hd95=round(float(np.mean([v.hd95 for v in self.lesion_wise.values()])), 3))
                for name, value in self.lesion_wise.items():
                    row.update({f"lesion_dice_{name}": round(value.dice, 6), f"lesion_hd95_{name}": round(value.hd95, 3),
                                f"lesions_{name}": value.lesions, f"false_positives_{name}": value.false_positives})
            if len(self.overlaps) > 1:
                for name, overlap in self.overlaps.items():
                    row.update({f"dice_{name}": round(overlap.dice, 6), f"iou_{name}": round(overlap.iou, 6),
                                f"hd95_{name}": round(self.hd95[name], 3),
                                f"truth_ml_{name}": round(overlap.truth * self.voxel_ml, 3),
                                f"predicted_ml_{name}": round(overlap.predicted * self.voxel_ml, 3)})
        if self.mse is not None:
            row["mse"] = round(self.mse, 6)
        row["seconds"] = round(self.seconds, 3)
        return row


def case_seed(case_id: str) -> int:
    return int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:8], "little")


def infer(model: torch.nn.Module, image: np.ndarray, hp: Hyperparameters, device: torch.device) -> torch.Tensor:
    """Sliding-window output ``(C, D, H, W)`` float32 on the CPU for a normalised volume ``(C_in, D, H, W)``."""
    return sliding_window(model, image, hp.patch_size, hp.sw_overlap, hp.sw_batch_size, hp.precision, device)


CROP_SHAPE = (32, 64, 64)  # at most 256 KiB of float16 image per case, plus two uint8 labels


def tumour_crop(image: np.ndarray, mask: np.ndarray, prediction: np.ndarray, spacing: tuple) -> dict:
    """A bounded box of the image ``(C, D, H, W)`` (every sequence), mask and prediction ``(D, H, W)``
    centred on the tumour (truth, else prediction). Mask and prediction are structure maps
    (:func:`brainseg.tasks.structure_map`: value k for the k-th structure of the run's ``structures``).

    ``origin`` is the box's ``(z, y, x)`` in the volume, ``spacing`` its voxel size in mm; the
    image is float16 (normalised values).
    """
    centre = tumour_centre(mask, prediction)
    start = [int(min(max(c - s // 2, 0), max(n - s, 0))) for c, s, n in zip(centre, CROP_SHAPE, mask.shape)]
    box = tuple(slice(a, a + s) for a, s in zip(start, CROP_SHAPE))
    return {"image": image[(slice(None), *box)].astype(np.float16), "mask": mask[box].astype(np.uint8),
            "prediction": prediction[box].astype(np.uint8), "origin": np.asarray(start, dtype=np.int32),
            "spacing": np.asarray(spacing, dtype=np.float32)}


def _load(case: Case, hp: Hyperparameters, task: Task) -> tuple[np.ndarray, np.ndarray | None]:
    """The case's normalised channels ``(C, D, H, W)`` and its mask's label values (when scored)."""
    depth, rows, columns = case.image.shape
    scored = case.mask is not None and task.needs_masks
    images, mask = read_case_region(case, (0, depth, 0, rows, 0, columns), with_mask=scored)
    image = np.stack([normalize(channel, hp.normalization, stats)
                      for channel, stats in zip(images, case.summary.intensities)])
    return image, mask.astype(np.uint8) if scored else None


def _evaluate_one(model, case: Case, image: np.ndarray, mask, hp: Hyperparameters, task: Task, device,
                  target_spacing: TargetSpacing, started: float, crops: bool, postprocessing: dict | None,
                  blank: int | None = None) -> CaseResult:
    """Infer on the case's target grid (channel ``blank`` replaced by zeros); a segmentation is
    scored on the native grid (its output interpolated back), a reconstruction on the grid it was
    made on."""
    if blank is not None:
        image = image.copy()
        image[blank] = 0.0
    grid = target_spacing.grid_of(case)
    target = grid.volume_to_target(image)
    output = infer(model, task.model_input(target, case_seed(case.case_id)), hp, device)
    if task.needs_masks:
        scores = task.score(image, mask, grid.volume_to_native(output), case.image.spacing, postprocessing)
    else:
        scores = task.score(target, mask, output, grid.target_spacing)
    prediction, truth = scores.pop("prediction", None), scores.pop("truth", None)
    crop = (tumour_crop(image, truth, prediction, case.image.spacing)
            if crops and prediction is not None else None)
    return CaseResult(case.case_id, case.image.shape, time.perf_counter() - started, crop=crop,
                      voxel_ml=float(np.prod(case.image.spacing)) / 1000.0, **scores)


def evaluate(model: torch.nn.Module, cases: list[Case], hp: Hyperparameters, task: Task, device: torch.device,
             target_spacing: TargetSpacing = NATIVE, crops: bool = False, phase: str = "val",
             postprocessing: dict | None = None, blank: int | None = None) -> list[CaseResult]:
    """Evaluate ``cases`` (this rank's share when distributed) on the ``target_spacing`` grid; results
    of all ranks, by case ID. Segmentations are scored after ``postprocessing`` (``{structure: Rule}``);
    with ``blank`` that input channel is replaced by zeros (after normalisation).

    With ``crops`` each segmentation result carries a bounded :func:`tumour_crop`. Rank 0 shows
    its progress as ``phase`` (a bar in a terminal, a line every 30 s otherwise).
    """
    rank, world = distributed.rank(), distributed.world_size()
    mine = cases[rank::world]
    results = []
    was_training = model.training
    model.eval()
    threads = torch.get_num_threads()
    if device.type == "cpu":  # the DataLoader workers wait meanwhile: inference may use every core
        torch.set_num_threads(distributed.cpu_threads())
    progress = Progress(len(mine), phase=phase, unit="case", log_seconds=EVAL_LOG_SECONDS, enabled=rank == 0)
    try:
        with progress, ThreadPoolExecutor(1, thread_name_prefix="eval-read") as reader:
            upcoming = reader.submit(_load, mine[0], hp, task) if mine else None
            for number, case in enumerate(mine):
                started = time.perf_counter()
                loading, upcoming = upcoming, (reader.submit(_load, mine[number + 1], hp, task)
                                               if number + 1 < len(mine) else None)
                try:
                    image, mask = loading.result()
                except PixelDataError as err:
                    logger.warning("case %s left out of the evaluation: its pixels cannot be decoded (%s)",
                                   case.case_id, err)
                    results.append(CaseResult(case.case_id, case.image.shape, 0.0, error=str(err)))
                else:
                    results.append(_evaluate_one(model, case, image, mask, hp, task, device, target_spacing, started,
                                                 crops, postprocessing, blank))
                progress.update(number + 1)
    finally:
        model.train(was_training)
        torch.set_num_threads(threads)
    results = [result for part in distributed.gather(results) for result in part]
    return sorted(results, key=lambda result: result.case_id)


def validation_matches(matches: dict | None, validate: Callable[[], list[CaseResult]]) -> dict:
    """The best validation's lesion matches ``{case_id: {structure: LesionMatch}}``; ``None``: not at
    hand (e.g. after a resume past the best epoch), so ``validate()`` evaluates the cases again."""
    if matches is None:
        matches = {result.case_id: result.lesion_matches for result in validate() if result.lesion_matches}
    return matches


def choose_postprocessing(matches: dict, offers: dict[str, Offer]) -> dict[str, Choice]:
    """Each structure's :class:`~brainseg.postprocess.Choice` from the validation cases' lesion
    matches (``{case_id: {structure: LesionMatch}}``) among the ``offers``, logged with every rule
    tried and every rule not offered."""
    choices = choose([matches[case_id] for case_id in sorted(matches)], offers)
    for name, choice in choices.items():
        tried = "; ".join(f"{trial.rule.describe()} {trial.after:.4f} ({trial.lowered} lowered)"
                          for trial in choice.trials)
        logger.info("postprocessing %s: %s (validation lesion-wise Dice %.4f -> %.4f, %d cases; tried: %s)", name,
                    choice.rule.describe(), choice.before, choice.after, choice.cases, tried or "nothing")
        for description, reason in choice.withheld:
            logger.info("postprocessing %s: %s not offered: %s", name, description, reason)
    return choices


def choose_detection(matches: dict, rules: dict, truths: dict[str, bool]) -> Threshold:
    """The tumour-present threshold (:func:`brainseg.detection.threshold_of`) from the validation
    cases' lesion matches (``{case_id: {structure: LesionMatch}}``) under the chosen postprocessing
    ``rules`` and whether each case holds tumour (``truths``), logged."""
    threshold = threshold_of(matches, truths, rules)
    logger.info("detection: a study holds tumour when its largest predicted component exceeds %.4g ml (%s)",
                threshold.ml, threshold.chosen_on)
    return threshold


def detection(results: list[CaseResult], threshold: Threshold) -> dict:
    """summary.json's ``detection`` (:func:`brainseg.detection.detection_figures`) over the scored cases."""
    scored = [result for result in results if not result.error and result.overlaps is not None]
    return detection_figures([result.tumour_score_ml for result in scored], [result.has_tumour for result in scored],
                             threshold, sum((result.slices for result in scored), SliceCounts()))


def sequence_importance(model: torch.nn.Module, cases: list[Case], hp: Hyperparameters, task: Task,
                        device: torch.device, target_spacing: TargetSpacing, rules: dict,
                        intact: list[CaseResult]) -> dict:
    """summary.json's ``sequence_importance``: the first ``--sequence-importance`` test ``cases`` by
    case ID scored again with each sequence replaced by zeros (the body mean after z-scoring), each
    structure's Dice and lesion-wise Dice beside the same cases' ``intact`` figures. A structure
    that loses most without a sequence rests on it; one that loses nothing can do without it.
    ``reading`` says whether that measures information or reliance (:func:`importance_reading`)."""
    chosen = sorted(cases, key=lambda case: case.case_id)[:hp.sequence_importance]
    names = list(task.scheme.names)
    figures = lambda scores: {name: {"dice": scores.get(f"dice_{name}"), "lesion_dice": scores.get(f"lesion_dice_{name}")}
                              for name in names}
    ids = {case.case_id for case in chosen}
    among = hp.sequence_dropout_names
    kept = tuple(name for name in hp.sequence_names if among and name not in among)
    whole = figures(aggregate([result for result in intact if result.case_id in ids]))
    without = {}
    for channel, sequence in enumerate(hp.sequence_names):
        scores = figures(aggregate(evaluate(model, chosen, hp, task, device, target_spacing, phase=f"without {sequence}",
                                            postprocessing=rules, blank=channel)))
        without[sequence] = {name: {**values, "dice_drop": whole[name]["dice"] - values["dice"]}
                             for name, values in scores.items()}
        logger.info("sequence importance: without %s, test Dice %s (%d cases)", sequence, ", ".join(
            f"{name} {values['dice']:.3f} ({-values['dice_drop']:+.3f})" for name, values in without[sequence].items()),
            len(chosen))
    return {"cases": len(chosen), "replaced_by": "zeros (the body mean after z-scoring; black after min-max)",
            "reading": importance_reading(hp.sequence_dropout, kept), "intact": whole, "without": without}


def importance_reading(sequence_dropout: float, never_dropped: tuple = ()) -> str:
    """How to read sequence importance, by whether training ever showed the model a missing sequence;
    ``never_dropped``: the sequences dropout was not allowed to drop (``--sequence-dropout-among``)."""
    if sequence_dropout:
        exception = (f"; except without {', '.join(never_dropped)}, which training never dropped "
                     "(--sequence-dropout-among): those figures read as reliance") if never_dropped else ""
        return (f"information: trained with --sequence-dropout {sequence_dropout:g}, the model has seen a sequence "
                "replaced by zeros, so what a structure loses without a sequence is what that sequence carries"
                + exception)
    return ("reliance: trained without --sequence-dropout, the model never saw a sequence replaced by zeros, so a "
            "structure's loss says which sequences the network leans on, which need not be those that carry the "
            "tumour; train with --sequence-dropout to measure what each sequence carries")


def aggregate(results: list[CaseResult]) -> dict:
    """Set-level figures: mean and median per-case Dice/IoU and Dice of the summed counts (or MSE),
    over the cases that could be read (``unreadable`` counts the others)."""
    unreadable = sum(1 for result in results if result.error)
    results = [result for result in results if not result.error]
    if not results:
        return {"unreadable": unreadable} if unreadable else {}
    if results[0].overlaps is None:
        errors = [result.mse for result in results]
        return {"loss": float(np.mean(errors)), "loss_median": float(np.median(errors)), "cases": len(results),
                "unreadable": unreadable}
    names = list(results[0].overlaps)
    scores = {}
    for name in names:
        total = sum((result.overlaps[name] for result in results), Overlap(0, 0, 0))
        scores.update({f"dice_{name}": float(np.mean([result.overlaps[name].dice for result in results])),
                       f"iou_{name}": float(np.mean([result.overlaps[name].iou for result in results])),
                       f"hd95_{name}": float(np.mean([result.hd95[name] for result in results])),
                       f"dice_global_{name}": total.dice, f"iou_global_{name}": total.iou})
        if results[0].lesion_wise:
            lesions = [result.lesion_wise[name] for result in results]
            scores.update({f"lesion_dice_{name}": float(np.mean([value.dice for value in lesions])),
                           f"lesion_hd95_{name}": float(np.mean([value.hd95 for value in lesions])),
                           f"lesions_{name}": sum(value.lesions for value in lesions),
                           f"false_positives_{name}": sum(value.false_positives for value in lesions)})
    dice = [result.dice for result in results]
    mean_of = lambda figure: float(np.mean([scores[f"{figure}_{name}"] for name in names]))
    lesion_means = ({"lesion_dice": mean_of("lesion_dice"), "lesion_hd95": mean_of("lesion_hd95")}
                    if results[0].lesion_wise else {})
    return {"dice": float(np.mean(dice)), "dice_median": float(np.median(dice)), "iou": mean_of("iou"),
            "hd95": mean_of("hd95"), "dice_global": mean_of("dice_global"), "iou_global": mean_of("iou_global"),
            **lesion_means, **scores, "cases": len(results), "unreadable": unreadable}
