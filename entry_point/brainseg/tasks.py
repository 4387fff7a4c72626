"""What a training task is: the network's output channels, whether cases need masks, how a batch
becomes inputs and targets, the loss, how a case is scored, the validation figure early stopping
maximises, and the fields of the epoch line, the test line and the summary.

The engine and the evaluation ask the run's :class:`Task` instead of branching on ``hp.task``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from brainseg.config import Hyperparameters
from brainseg.data.pretext import drop_blocks
from brainseg.labels import LabelScheme
from brainseg.metrics import score_structures
from brainseg.model.losses import build_loss
from brainseg.postprocess import apply_rules

PRETEXT_STREAM = 11  # the third key of the per-step generator that blanks training blocks


class Task:
    name: str
    out_channels: int
    needs_masks: bool
    transfers_encoder: bool  # its kept weights' encoder is saved on its own, for other runs to start from
    test_fields: tuple[str, ...]  # the test line's figures, each ``test_<aggregate name>``

    def loss(self, hp: Hyperparameters) -> torch.nn.Module:
        raise NotImplementedError

    def inputs_and_target(self, batch: dict, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's input and the loss's target for one training batch (on the batch's device)."""
        raise NotImplementedError

    def model_input(self, image: np.ndarray, case_seed: int) -> np.ndarray:
        """The volume ``(C, D, H, W)`` the network sees when a whole case is evaluated."""
        return image

    def score(self, image: np.ndarray, mask: np.ndarray | None, output: torch.Tensor, spacing: tuple,
              postprocessing: dict | None = None) -> dict:
        """A case's figures (:class:`~brainseg.run.evaluate.CaseResult` fields) from the network's
        output ``(C, D, H, W)``, after ``postprocessing`` (``{structure: Rule}``) where the task
        has structures; ``prediction`` (a volume of everything predicted) when there is one."""
        raise NotImplementedError

    def validation(self, scores: dict) -> tuple[dict, float]:
        """The epoch line's validation fields and the figure early stopping maximises."""
        raise NotImplementedError

    def summary(self, best: float, scores: dict) -> dict:
        """The summary's headline figures from the best validation figure and the test scores."""
        raise NotImplementedError

    def best_field(self, best: float) -> dict:
        """The running best validation figure as the epoch line publishes it (a tuning objective)."""
        raise NotImplementedError

    def test_values(self, scores: dict) -> dict:
        return {name: scores.get(name.removeprefix("test_"), math.nan) for name in self.test_fields}


class Segmentation(Task):
    """Tumour structures from the mask's labels (:mod:`brainseg.labels`): softmax over background and
    mutually exclusive classes, or one sigmoid channel per overlapping region. Dice, IoU and HD95 per
    structure; the headline figures are their means."""

    name, needs_masks, transfers_encoder = "segmentation", True, False
    test_fields = ("test_dice", "test_dice_median", "test_iou", "test_hd95")

    def __init__(self, scheme: LabelScheme):
        self.scheme = scheme
        self.out_channels = scheme.out_channels
        self.table = torch.from_numpy(scheme.lookup())

    def loss(self, hp: Hyperparameters) -> torch.nn.Module:
        return build_loss(hp.loss, sigmoid=self.scheme.sigmoid, deep_supervision=hp.deep_supervision)

    def inputs_and_target(self, batch: dict, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The target of label values ``(N, 1, D, H, W)``: class indices ``(N, 1, ...)`` (softmax) or
        one 0/1 channel per region ``(N, R, ...)`` (sigmoid, float)."""
        label = batch["label"]
        target = self.table.to(label.device)[:, label[:, 0].long()].transpose(0, 1)
        return batch["image"], target.float() if self.scheme.sigmoid else target

    def score(self, image: np.ndarray, mask: np.ndarray | None, output: torch.Tensor, spacing: tuple,
              postprocessing: dict | None = None) -> dict:
        predicted = apply_rules(postprocessing or {}, self.scheme.names, self.scheme.predicted(output.numpy()), spacing)
        truth = [structure.of(mask) for structure in self.scheme.structures]
        return {**score_structures(self.scheme.structures, predicted, mask, spacing),
                "prediction": structure_map(predicted), "truth": structure_map(truth)}

    def structure_fields(self, prefix: str, scores: dict) -> dict:
        """``{<prefix>dice_<name>: ...}`` per structure, when there are several."""
        if len(self.scheme.structures) < 2:
            return {}
        return {f"{prefix}{figure}_{name}": scores[f"{figure}_{name}"] for name in self.scheme.names
                for figure in ("dice", "hd95")}

    def lesion_fields(self, prefix: str, scores: dict) -> dict:
        """BraTS's lesion-wise Dice and HD95 (means over the structures), when the scores hold them."""
        return {f"{prefix}lesion_{figure}": scores[f"lesion_{figure}"] for figure in ("dice", "hd95")
                if f"lesion_{figure}" in scores}

    def lesion_wise(self, scores: dict) -> dict:
        """summary.json's ``lesion_wise``: per structure its Dice, HD95, scored lesions and false positives."""
        if "lesion_dice" not in scores:
            return {}
        return {"lesion_wise": {name: {"dice": scores[f"lesion_dice_{name}"], "hd95": scores[f"lesion_hd95_{name}"],
                                       "lesions": scores[f"lesions_{name}"],
                                       "false_positives": scores[f"false_positives_{name}"]}
                                for name in self.scheme.names}}

    def validation(self, scores: dict) -> tuple[dict, float]:
        return ({"val_dice": scores["dice"], "val_iou": scores["iou"], "val_dice_global": scores["dice_global"],
                 **self.lesion_fields("val_", scores), **self.structure_fields("val_", scores)}, scores["dice"])

    def best_field(self, best: float) -> dict:
        return {"best_val_dice": best}

    def summary(self, best: float, scores: dict) -> dict:
        return {"best_val_dice": best, "test_dice_mean": scores.get("dice"),
                "test_dice_median": scores.get("dice_median"), "test_iou_mean": scores.get("iou"),
                "test_dice_global": scores.get("dice_global"), "test_hd95_mean": scores.get("hd95"),
                "structures": list(self.scheme.names), **self.lesion_fields("test_", scores),
                **self.lesion_wise(scores),
                **({name: value for name, value in self.structure_fields("test_", scores).items()}
                   if scores.get("cases") else {})}

    def test_values(self, scores: dict) -> dict:
        return {**super().test_values(scores), **self.lesion_fields("test_", scores),
                **(self.structure_fields("test_", scores) if scores.get("cases") else {})}


class Autoencoder(Task):
    """Masked-image reconstruction pretraining on images without masks: blanked blocks in, the
    whole image (every sequence) out, mean squared error (lower is better, so early stopping
    maximises its negative)."""

    name, needs_masks, transfers_encoder = "autoencoder", False, True
    test_fields = ("test_loss",)

    def __init__(self, channels: int):
        self.out_channels = channels

    def loss(self, hp: Hyperparameters) -> torch.nn.Module:
        return torch.nn.MSELoss()

    def inputs_and_target(self, batch: dict, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = batch["image"]
        rng = np.random.default_rng([seed, step, PRETEXT_STREAM])
        return torch.from_numpy(drop_blocks(image.cpu().numpy(), rng)).to(image.device), image

    def model_input(self, image: np.ndarray, case_seed: int) -> np.ndarray:
        return drop_blocks(image, np.random.default_rng(case_seed))

    def score(self, image: np.ndarray, mask: np.ndarray | None, output: torch.Tensor, spacing: tuple,
              postprocessing: dict | None = None) -> dict:
        return {"mse": float(np.mean((output.numpy() - image) ** 2))}

    def validation(self, scores: dict) -> tuple[dict, float]:
        return {"val_loss": scores["loss"]}, -scores["loss"]

    def best_field(self, best: float) -> dict:
        return {"best_val_loss": -best}

    def summary(self, best: float, scores: dict) -> dict:
        return {"best_val_loss": -best, "test_loss": scores.get("loss")}


def structure_map(masks: list[np.ndarray]) -> np.ndarray:
    """One uint8 volume from per-structure masks: voxel value k (1-based) for the last structure in
    scheme order that covers it (the innermost of nested regions: ET over TC over WT), 0 for none."""
    labelled = np.zeros(masks[0].shape, dtype=np.uint8)
    for number, mask in enumerate(masks, start=1):
        labelled[mask] = number
    return labelled


def task_of(hp: Hyperparameters) -> Task:
    """The run's task, built from its hyperparameters (labels and regions, sequences)."""
    if hp.task == "autoencoder":
        return Autoencoder(len(hp.sequence_names))
    return Segmentation(hp.label_scheme)
