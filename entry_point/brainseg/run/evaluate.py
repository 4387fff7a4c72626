"""Whole-volume evaluation: read each case through the region reader, sliding-window inference,
per-case overlap (segmentation) or reconstruction error (autoencoder).

The next case's volumes are read while the current one is inferred. Under torch.distributed each
rank evaluates its share of the cases and every rank receives all results.
"""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from brainseg.config import Hyperparameters
from brainseg.data.catalog import Case
from brainseg.data.transforms import normalize
from brainseg.dicom import PixelDataError
from brainseg.run import distributed
from brainseg.run.metrics import Overlap, tumour_centre
from brainseg.run.progress import Progress
from brainseg.tasks import task_of

logger = logging.getLogger(__name__)
EVAL_LOG_SECONDS = 30.0  # without a terminal, a progress line at most this often while evaluating


@dataclass(frozen=True)
class CaseResult:
    """One evaluated case. ``overlap`` for segmentation, ``mse`` for the autoencoder; ``error`` when
    its pixels could not be decoded (then it counts in no figure)."""

    case_id: str
    shape: tuple
    seconds: float
    overlap: Overlap | None = None
    truth_ml: float = 0.0
    predicted_ml: float = 0.0
    mse: float | None = None
    crop: dict | None = None  # image/mask/prediction around the tumour, for review overlays
    error: str = ""

    def row(self) -> dict:
        row = {"case_id": self.case_id, "shape": "x".join(map(str, self.shape))}
        if self.error:
            return {**row, "error": self.error}
        if self.overlap is not None:
            row.update(dice=round(self.overlap.dice, 6), iou=round(self.overlap.iou, 6),
                       truth_ml=round(self.truth_ml, 3), predicted_ml=round(self.predicted_ml, 3),
                       truth_voxels=self.overlap.truth, predicted_voxels=self.overlap.predicted,
                       intersection_voxels=self.overlap.intersection)
        if self.mse is not None:
            row["mse"] = round(self.mse, 6)
        row["seconds"] = round(self.seconds, 3)
        return row


def case_seed(case_id: str) -> int:
    return int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:8], "little")


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast when asked for, else a no-op context."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")


def infer(model: torch.nn.Module, image: np.ndarray, hp: Hyperparameters, device: torch.device) -> torch.Tensor:
    """Sliding-window output ``(C, D, H, W)`` float32 on the CPU for a normalised volume."""
    volume = torch.from_numpy(np.ascontiguousarray(image))[None, None].to(device)
    with torch.no_grad(), autocast(device, hp.precision):
        output = sliding_window_inference(volume, roi_size=hp.patch_size, sw_batch_size=hp.sw_batch_size,
                                          predictor=model, overlap=hp.sw_overlap, mode="gaussian")
    return output[0].float().cpu()


CROP_SHAPE = (32, 64, 64)  # at most 256 KiB of float16 image per case, plus two uint8 labels


def tumour_crop(image: np.ndarray, mask: np.ndarray, prediction: np.ndarray, spacing: tuple) -> dict:
    """A bounded box of image, mask and prediction centred on the tumour (truth, else prediction).

    ``origin`` is the box's ``(z, y, x)`` in the volume, ``spacing`` its voxel size in mm; the
    image is float16 (normalised values).
    """
    centre = tumour_centre(mask, prediction)
    start = [int(min(max(c - s // 2, 0), max(n - s, 0))) for c, s, n in zip(centre, CROP_SHAPE, image.shape)]
    box = tuple(slice(a, a + s) for a, s in zip(start, CROP_SHAPE))
    return {"image": image[box].astype(np.float16), "mask": mask[box].astype(np.uint8),
            "prediction": prediction[box].astype(np.uint8), "origin": np.asarray(start, dtype=np.int32),
            "spacing": np.asarray(spacing, dtype=np.float32)}


def _load(case: Case, hp: Hyperparameters) -> tuple[np.ndarray, np.ndarray | None]:
    summary = case.summary
    image = normalize(case.image.read_volume(), hp.normalization, summary.mean, summary.std,
                      summary.low, summary.high)
    mask = case.mask.read_volume() > 0 if case.mask is not None and task_of(hp).needs_masks else None
    return image, mask


def _evaluate_one(model, case: Case, image: np.ndarray, mask, hp: Hyperparameters, device, started: float,
                  crops: bool) -> CaseResult:
    task = task_of(hp)
    output = infer(model, task.model_input(image, case_seed(case.case_id)), hp, device)
    scores = task.score(image, mask, output, float(np.prod(case.image.spacing)) / 1000.0)
    prediction = scores.pop("prediction", None)
    crop = tumour_crop(image, mask, prediction, case.image.spacing) if crops and prediction is not None else None
    return CaseResult(case.case_id, image.shape, time.perf_counter() - started, crop=crop, **scores)


def evaluate(model: torch.nn.Module, cases: list[Case], hp: Hyperparameters, device: torch.device,
             crops: bool = False, phase: str = "val") -> list[CaseResult]:
    """Evaluate ``cases`` (this rank's share when distributed); results of all ranks, by case ID.

    With ``crops`` each segmentation result carries a bounded :func:`tumour_crop`. Rank 0 shows
    its progress as ``phase`` (a bar in a terminal, a line every 30 s otherwise).
    """
    rank, world = distributed.rank(), distributed.world_size()
    mine = cases[rank::world]
    results = []
    was_training = model.training
    model.eval()
    progress = Progress(len(mine), phase=phase, unit="case", log_seconds=EVAL_LOG_SECONDS, enabled=rank == 0)
    try:
        with progress, ThreadPoolExecutor(1, thread_name_prefix="eval-read") as reader:
            upcoming = reader.submit(_load, mine[0], hp) if mine else None
            for number, case in enumerate(mine):
                started = time.perf_counter()
                loading, upcoming = upcoming, (reader.submit(_load, mine[number + 1], hp)
                                               if number + 1 < len(mine) else None)
                try:
                    image, mask = loading.result()
                except PixelDataError as err:
                    logger.warning("case %s left out of the evaluation: its pixels cannot be decoded (%s)",
                                   case.case_id, err)
                    results.append(CaseResult(case.case_id, case.image.shape, 0.0, error=str(err)))
                else:
                    results.append(_evaluate_one(model, case, image, mask, hp, device, started, crops))
                progress.update(number + 1)
    finally:
        model.train(was_training)
    results = [result for part in distributed.gather(results) for result in part]
    return sorted(results, key=lambda result: result.case_id)


def aggregate(results: list[CaseResult]) -> dict:
    """Set-level figures: mean and median per-case Dice/IoU and Dice of the summed counts (or MSE),
    over the cases that could be read (``unreadable`` counts the others)."""
    unreadable = sum(1 for result in results if result.error)
    results = [result for result in results if not result.error]
    if not results:
        return {"unreadable": unreadable} if unreadable else {}
    if results[0].overlap is None:
        errors = [result.mse for result in results]
        return {"loss": float(np.mean(errors)), "loss_median": float(np.median(errors)), "cases": len(results),
                "unreadable": unreadable}
    dice = [result.overlap.dice for result in results]
    iou = [result.overlap.iou for result in results]
    total = sum((result.overlap for result in results), Overlap(0, 0, 0))
    return {"dice": float(np.mean(dice)), "dice_median": float(np.median(dice)), "iou": float(np.mean(iou)),
            "dice_global": total.dice, "iou_global": total.iou, "cases": len(results), "unreadable": unreadable}
