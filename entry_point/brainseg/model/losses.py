"""Segmentation losses: Dice+CE (default), Dice, Focal Tversky.

They take logits ``(N, 2, D, H, W)`` and labels ``(N, 1, D, H, W)`` (0/1).
"""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss, DiceLoss, TverskyLoss

# Focal Tversky (Abraham & Khan, 2019): alpha weighs false positives, beta false negatives.
TVERSKY_ALPHA, TVERSKY_BETA, FOCAL_GAMMA = 0.3, 0.7, 0.75


class FocalTverskyLoss(torch.nn.Module):
    """``mean((1 - TverskyIndex) ** gamma)`` over the tumour class of each sample."""

    def __init__(self, alpha: float = TVERSKY_ALPHA, beta: float = TVERSKY_BETA, gamma: float = FOCAL_GAMMA):
        super().__init__()
        self.gamma = gamma
        self.tversky = TverskyLoss(include_background=False, to_onehot_y=True, softmax=True,
                                   alpha=alpha, beta=beta, reduction="none")

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.tversky(logits, label).clamp_min(0).pow(self.gamma).mean()


def build_loss(name: str) -> torch.nn.Module:
    """The segmentation loss ``name`` (one of :data:`brainseg.config.LOSSES`)."""
    if name == "dice_ce":
        return DiceCELoss(to_onehot_y=True, softmax=True)
    if name == "dice":
        return DiceLoss(to_onehot_y=True, softmax=True)
    if name == "focal_tversky":
        return FocalTverskyLoss()
    raise ValueError(f"loss {name!r}: expected one of dice_ce, dice, focal_tversky")
