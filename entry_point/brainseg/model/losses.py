"""Segmentation losses: Dice + cross-entropy (default), Dice, Focal Tversky.

They take logits ``(N, C, D, H, W)`` and either class indices ``(N, 1, D, H, W)`` (softmax over
background and classes) or, with ``sigmoid``, one 0/1 target channel per region ``(N, C, ...)``.
``dice_ce`` is Dice + softmax cross-entropy over background and classes, or Dice + binary
cross-entropy of every region channel at every voxel (:class:`DiceBCELoss`, as nnU-Net's
region-based training): regions overlap (ET inside TC inside WT) and have no background channel,
so a background voxel is penalised only through each region's own binary term. (MONAI's
``DiceCELoss(sigmoid=True)`` takes a softmax cross-entropy over the region channels when there
are several, which is 0 on a background voxel whatever the logits.) Focal Tversky has no
cross-entropy companion. With deep supervision the network's training output stacks its
full-resolution head and the upsampled coarser heads ``(N, 1 + K, C, D, H, W)``;
:class:`DeepSupervised` weighs them 1, 1/2, 1/4, ... (normalised to sum to 1), as nnU-Net does.
"""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss, DiceLoss, TverskyLoss

# Focal Tversky (Abraham & Khan, 2019): alpha weighs false positives, beta false negatives.
TVERSKY_ALPHA, TVERSKY_BETA, FOCAL_GAMMA = 0.3, 0.7, 0.75


class FocalTverskyLoss(torch.nn.Module):
    """``mean((1 - TverskyIndex) ** gamma)`` over the tumour classes (or regions) of each sample."""

    def __init__(self, alpha: float = TVERSKY_ALPHA, beta: float = TVERSKY_BETA, gamma: float = FOCAL_GAMMA,
                 sigmoid: bool = False):
        super().__init__()
        self.gamma = gamma
        self.tversky = TverskyLoss(include_background=sigmoid, to_onehot_y=not sigmoid, softmax=not sigmoid,
                                   sigmoid=sigmoid, alpha=alpha, beta=beta, reduction="none")

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.tversky(logits, label).clamp_min(0).pow(self.gamma).mean()


class DiceBCELoss(torch.nn.Module):
    """Dice of each sigmoid region channel (per sample, averaged) plus the binary cross-entropy of
    every channel at every voxel (averaged), with equal weights."""

    def __init__(self):
        super().__init__()
        self.dice = DiceLoss(sigmoid=True)
        self.bce = torch.nn.BCEWithLogitsLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"region logits {tuple(logits.shape)} and target {tuple(target.shape)}: expected one "
                             "0/1 target channel per region, the same shape")
        target = target.to(logits.dtype)
        return self.dice(logits, target) + self.bce(logits, target)


class DeepSupervised(torch.nn.Module):
    """``loss`` over every head of a deep-supervised output, weights halving per head; a plain
    ``(N, C, ...)`` output (evaluation, or a network without heads) is scored as it is."""

    def __init__(self, loss: torch.nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if output.dim() == target.dim():
            return self.loss(output, target)
        heads = output.unbind(1)
        weights = [0.5 ** index for index in range(len(heads))]
        return sum(weight * self.loss(head, target) for weight, head in zip(weights, heads)) / sum(weights)


def build_loss(name: str, sigmoid: bool = False, deep_supervision: bool = False) -> torch.nn.Module:
    """The segmentation loss ``name`` (one of :data:`brainseg.config.LOSSES`), over softmax classes
    or, with ``sigmoid``, independent regions; over every head with ``deep_supervision``."""
    if deep_supervision:
        return DeepSupervised(build_loss(name, sigmoid))
    activation = {"to_onehot_y": not sigmoid, "softmax": not sigmoid, "sigmoid": sigmoid}
    if name == "dice_ce":
        return DiceBCELoss() if sigmoid else DiceCELoss(**activation)
    if name == "dice":
        return DiceLoss(**activation)
    if name == "focal_tversky":
        return FocalTverskyLoss(sigmoid=sigmoid)
    raise ValueError(f"loss {name!r}: expected one of dice_ce, dice, focal_tversky")
