"""Optimisers and learning-rate schedules (per optimiser step, with linear warm-up)."""

from __future__ import annotations

import math

import torch

from brainseg.config import Hyperparameters

POLY_POWER = 0.9
ONECYCLE_MIN_PCT = 0.01  # OneCycleLR needs a non-empty rising phase


def build_optimizer(parameters, hp: Hyperparameters) -> torch.optim.Optimizer:
    trainable = [p for p in parameters if p.requires_grad]
    if hp.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay,
                               nesterov=hp.momentum > 0)
    optimizer = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
    return optimizer(trainable, lr=hp.lr, weight_decay=hp.weight_decay)


def warmup_factor(step: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base learning rate before optimiser step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return (1.0 - progress) ** POLY_POWER


def build_scheduler(optimizer: torch.optim.Optimizer, hp: Hyperparameters,
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per optimiser step. ``onecycle`` is torch's OneCycleLR (momentum cycled too),
    rising over ``warmup_steps``; the others warm up linearly, then decay (cosine, poly) or hold."""
    if hp.schedule == "onecycle":
        rising = min(0.5, max(ONECYCLE_MIN_PCT, hp.warmup_steps / total_steps))
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=total_steps,
                                                   pct_start=rising)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_factor(step, hp.schedule, hp.warmup_steps, total_steps))
