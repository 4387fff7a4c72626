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
from brainseg.model.losses import build_loss
from brainseg.run.metrics import Overlap

PRETEXT_STREAM = 11  # the third key of the per-step generator that blanks training blocks


class Task:
    name: str
    out_channels: int
    needs_masks: bool
    transfers_encoder: bool  # its best weights' encoder is saved on its own, for other runs to start from
    test_fields: tuple[str, ...]  # the test line's figures, each ``test_<aggregate name>``

    def loss(self, hp: Hyperparameters) -> torch.nn.Module:
        raise NotImplementedError

    def inputs_and_target(self, batch: dict, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's input and the loss's target for one training batch (CPU tensors)."""
        raise NotImplementedError

    def model_input(self, image: np.ndarray, case_seed: int) -> np.ndarray:
        """The volume the network sees when a whole case is evaluated."""
        return image

    def score(self, image: np.ndarray, mask: np.ndarray | None, output: torch.Tensor, voxel_ml: float) -> dict:
        """A case's figures (:class:`~brainseg.run.evaluate.CaseResult` fields) from the network's
        output ``(C, D, H, W)``; ``prediction`` (a label volume) when there is one."""
        raise NotImplementedError

    def validation(self, scores: dict) -> tuple[dict, float]:
        """The epoch line's validation fields and the figure early stopping maximises."""
        raise NotImplementedError

    def summary(self, best: float, scores: dict) -> dict:
        """The summary's headline figures from the best validation figure and the test scores."""
        raise NotImplementedError

    def test_values(self, scores: dict) -> dict:
        return {name: scores.get(name.removeprefix("test_"), math.nan) for name in self.test_fields}


class Segmentation(Task):
    """Tumour vs background: softmax over two channels, Dice/IoU against the mask."""

    name, out_channels, needs_masks, transfers_encoder = "segmentation", 2, True, False
    test_fields = ("test_dice", "test_dice_median", "test_iou")

    def loss(self, hp: Hyperparameters) -> torch.nn.Module:
        return build_loss(hp.loss)

    def inputs_and_target(self, batch: dict, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["image"], batch["label"]

    def score(self, image: np.ndarray, mask: np.ndarray | None, output: torch.Tensor, voxel_ml: float) -> dict:
        prediction = output.argmax(0).numpy().astype(bool)
        overlap = Overlap.of(prediction, mask)
        return {"overlap": overlap, "truth_ml": overlap.truth * voxel_ml, "predicted_ml": overlap.predicted * voxel_ml,
                "prediction": prediction}

    def validation(self, scores: dict) -> tuple[dict, float]:
        return ({"val_dice": scores["dice"], "val_iou": scores["iou"], "val_dice_global": scores["dice_global"]},
                scores["dice"])

    def summary(self, best: float, scores: dict) -> dict:
        return {"best_val_dice": best, "test_dice_mean": scores.get("dice"),
                "test_dice_median": scores.get("dice_median"), "test_iou_mean": scores.get("iou"),
                "test_dice_global": scores.get("dice_global")}


class Autoencoder(Task):
    """Masked-image reconstruction pretraining on images without masks: blanked blocks in, the
    whole image out, mean squared error (lower is better, so early stopping maximises its negative)."""

    name, out_channels, needs_masks, transfers_encoder = "autoencoder", 1, False, True
    test_fields = ("test_loss",)

    def loss(self, hp: Hyperparameters) -> torch.nn.Module:
        return torch.nn.MSELoss()

    def inputs_and_target(self, batch: dict, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = batch["image"]
        rng = np.random.default_rng([seed, step, PRETEXT_STREAM])
        return torch.from_numpy(drop_blocks(image.numpy(), rng)), image

    def model_input(self, image: np.ndarray, case_seed: int) -> np.ndarray:
        return drop_blocks(image, np.random.default_rng(case_seed))

    def score(self, image: np.ndarray, mask: np.ndarray | None, output: torch.Tensor, voxel_ml: float) -> dict:
        return {"mse": float(np.mean((output[0].numpy() - image) ** 2))}

    def validation(self, scores: dict) -> tuple[dict, float]:
        return {"val_loss": scores["loss"]}, -scores["loss"]

    def summary(self, best: float, scores: dict) -> dict:
        return {"best_val_loss": -best, "test_loss": scores.get("loss")}


TASKS = {task.name: task for task in (Segmentation(), Autoencoder())}


def task_of(hp: Hyperparameters) -> Task:
    return TASKS[hp.task]
