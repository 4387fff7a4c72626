"""Optimisers and learning-rate schedules (per optimiser step, with linear warm-up)."""

from __future__ import annotations

import math

import torch

POLY_POWER = 0.9
ONECYCLE_MIN_PCT = 0.01  # OneCycleLR needs a non-empty rising phase


def build_optimizer(parameters, name: str, lr: float, weight_decay: float,
                    momentum: float = 0.0) -> torch.optim.Optimizer:
    """``adamw``, ``adam`` or ``sgd`` (Nesterov when ``momentum`` > 0) over the trainable ``parameters``."""
    trainable = [p for p in parameters if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    optimizer = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return optimizer(trainable, lr=lr, weight_decay=weight_decay)


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


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, lr: float, warmup_steps: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per optimiser step. ``onecycle`` is torch's OneCycleLR (momentum cycled too),
    rising over ``warmup_steps``; the others warm up linearly, then decay (cosine, poly) or hold."""
    if schedule == "onecycle":
        rising = min(0.5, max(ONECYCLE_MIN_PCT, warmup_steps / total_steps))
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps, pct_start=rising)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_factor(step, schedule, warmup_steps, total_steps))
