"""Segmentation losses: Dice+CE (default), Dice, Focal Tversky.

They take logits ``(N, C, D, H, W)`` and either class indices ``(N, 1, D, H, W)`` (softmax over
background and classes) or, with ``sigmoid``, one 0/1 target channel per region ``(N, C, ...)``
(Dice + binary cross-entropy, every channel counted: there is no background channel).
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


def build_loss(name: str, sigmoid: bool = False) -> torch.nn.Module:
    """The segmentation loss ``name`` (one of :data:`brainseg.config.LOSSES`), over softmax classes
    or, with ``sigmoid``, independent regions."""
    activation = {"to_onehot_y": not sigmoid, "softmax": not sigmoid, "sigmoid": sigmoid}
    if name == "dice_ce":
        return DiceCELoss(**activation)
    if name == "dice":
        return DiceLoss(**activation)
    if name == "focal_tversky":
        return FocalTverskyLoss(sigmoid=sigmoid)
    raise ValueError(f"loss {name!r}: expected one of dice_ce, dice, focal_tversky")
