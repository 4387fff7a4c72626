"""The peer: MONAI's BraTS pipeline as its users write it, on volumes held in memory.

What a MONAI user writes from the BraTS tutorial (``3d_segmentation/brats_segmentation_3d``) for
a short schedule on patches: ``ConvertToMultiChannelBasedOnBratsClassesd``,
``NormalizeIntensityd(nonzero=True, channel_wise=True)``, ``RandCropByPosNegLabeld`` (1:1, four
crops per volume), ``RandFlipd`` on each axis, ``RandScaleIntensityd(0.1)`` and
``RandShiftIntensityd(0.1)``; Dice + binary cross-entropy per region channel (``DiceLoss(sigmoid)``
plus ``BCEWithLogitsLoss``); AdamW at 1e-3 (weight decay 1e-5) with cosine annealing over the
steps and no warm-up or clipping; the weights of the best validation epoch kept. (The tutorial
itself trains 300 epochs of whole 224×224×144 crops with Dice and Adam at 1e-4; at a few hundred
steps on patches that learns nothing, so this is what its users run at that length, and what issue
31's held-back comparison ran.) Only the network, patch, batch, steps and the validation points
are the benchmark's, so that the two pipelines differ in their recipes alone.

Studies arrive raw ``(4, D, H, W)`` with their BraTS labels; training volumes are resampled in
memory to the run's spacing first (linear; labels nearest), as ``Spacingd`` would, and whole
studies are inferred on that grid and mapped back to their own.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.losses import DiceLoss
from monai.transforms import (
    Compose,
    ConvertToMultiChannelBasedOnBratsClassesd,
    NormalizeIntensityd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from scoring import Member, score_cases

from brainseg.data.resample import TargetSpacing

LR, WEIGHT_DECAY = 1e-3, 1e-5
CROPS_PER_VOLUME = 4


def normalise(image: np.ndarray) -> np.ndarray:
    """``NormalizeIntensityd(nonzero=True, channel_wise=True)``: each channel's non-zero voxels
    z-scored with their own mean and standard deviation, zeros left at 0."""
    out = np.zeros(image.shape, dtype=np.float32)
    for index, channel in enumerate(image.astype(np.float32)):
        inside = channel != 0
        if inside.any():
            out[index][inside] = (channel[inside] - channel[inside].mean()) / max(float(channel[inside].std()), 1e-8)
    return out


class DiceBCE(torch.nn.Module):
    """``DiceLoss(sigmoid=True)`` + ``BCEWithLogitsLoss``: the tutorial user's Dice + BCE per region."""

    def __init__(self):
        super().__init__()
        self.dice, self.bce = DiceLoss(sigmoid=True), torch.nn.BCEWithLogitsLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice(logits, target) + self.bce(logits, target)


def _to_ours(label: torch.Tensor) -> torch.Tensor:
    """ConvertToMultiChannelBasedOnBratsClasses gives TC, WT, ET; the scorer's order is WT, TC, ET."""
    return label[:, [1, 0, 2]]


def resampled(study: dict, spacing: tuple) -> dict:
    """A study's raw channels and labels ``(1, D, H, W)`` on the ``spacing`` grid (``()``: its own)."""
    grid = TargetSpacing(spacing or study["spacing"]).grid(study["label"].shape, study["spacing"])
    return {"image": grid.volume_to_target(study["image"].astype(np.float32)),
            "label": grid.volume_to_target(study["label"][None], labels=True)}


def member(model: torch.nn.Module, patch_size: tuple, spacing: tuple) -> Member:
    """The trained model as a scoring member (its channels thresholded at 0.5 each, as the tutorial does)."""
    return Member(model, patch_size, lambda study: normalise(study["image"]), spacing, "linear")


def train(model: torch.nn.Module, train_studies: list[dict], val_studies: list[dict], patch_size: tuple,
          batch_size: int, epochs: int, steps_per_epoch: int, seed: int, spacing: tuple = ()) -> dict:
    """Train ``model`` on ``train_studies`` (``image`` raw ``(4, D, H, W)``, ``label``, ``spacing``),
    resampled to ``spacing`` (``()``: their own grids), for ``epochs`` x ``steps_per_epoch`` steps
    of ``batch_size`` crops, validating on ``val_studies`` after each epoch; the best epoch's
    weights are loaded into ``model``. Its wall time and validation history."""
    started = time.perf_counter()
    train_volumes = [resampled(study, spacing) for study in train_studies]
    keys = ["image", "label"]
    transform = Compose([
        ConvertToMultiChannelBasedOnBratsClassesd(keys="label"),
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=patch_size, pos=1, neg=1,
                               num_samples=CROPS_PER_VOLUME),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=0), RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
        RandScaleIntensityd(keys="image", factors=0.1, prob=1.0), RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
    ])
    transform.set_random_state(seed=seed)
    dataset = CacheDataset([{"image": v["image"].astype(np.float32), "label": v["label"]} for v in train_volumes],
                           transform, num_workers=2, progress=False)
    loader = DataLoader(dataset, batch_size=1, shuffle=True, num_workers=2)  # one volume's crops per item
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    loss_function = DiceBCE()
    validation = [member(model, patch_size, spacing)]
    best, best_weights, best_epoch, history = -1.0, None, 0, []
    for epoch in range(1, epochs + 1):
        model.train()
        done, losses = 0, []
        while done < steps_per_epoch:
            for item in loader:
                for start in range(0, item["image"].shape[0], batch_size):
                    image = item["image"][start:start + batch_size].as_tensor().float()
                    target = _to_ours(item["label"][start:start + batch_size].as_tensor().float())
                    optimizer.zero_grad()
                    loss = loss_function(model(image), target)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    losses.append(float(loss.detach()))
                    done += 1
                    if done >= steps_per_epoch:
                        break
                if done >= steps_per_epoch:
                    break
        dice = float(np.mean([row["dice_mean"] for row in score_cases(validation, val_studies)["raw"]]))
        history.append({"epoch": epoch, "train_loss": round(float(np.mean(losses)), 4), "val_dice": round(dice, 4)})
        print(f"# monai epoch {epoch}: {history[-1]}", flush=True)
        if dice > best:
            best, best_epoch = dice, epoch
            best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_weights)
    return {"wall_seconds": round(time.perf_counter() - started, 1), "best_epoch": best_epoch,
            "best_val_dice": round(best, 4), "history": history}
