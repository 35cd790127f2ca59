"""Learning-rate schedules over a whole run, the `model.scheduler` partials (conf/model/scheduler):
each is called with the optimiser, the run's total optimiser steps and its epoch count (what the
Trainer knows once fitting starts) and steps once per optimiser step."""

from __future__ import annotations

from monai.optimizers import WarmupCosineSchedule
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler


def cosine(optimizer: Optimizer, total_steps: int, max_epochs: int | None) -> LRScheduler:
    """Half a cosine from the optimiser's lr to 0 over the run."""
    return CosineAnnealingLR(optimizer, T_max=total_steps)


def warmup_cosine(optimizer: Optimizer, total_steps: int, max_epochs: int | None,
                  warmup_epochs: int = 0, warmup_multiplier: float = 0.0) -> LRScheduler:
    """MONAI's WarmupCosineSchedule: a linear warm-up over `warmup_epochs` from
    `warmup_multiplier` x lr (the vista3d bundle: 3 epochs from 0.1), then a cosine to 0."""
    if warmup_epochs < 0:
        raise ValueError(f"model.scheduler.warmup_epochs must be >= 0, got {warmup_epochs}")
    if not 0.0 <= warmup_multiplier < 1.0:
        raise ValueError("model.scheduler.warmup_multiplier must be in [0, 1), got "
                         f"{warmup_multiplier}")
    if warmup_epochs and (max_epochs is None or max_epochs < 1):
        raise ValueError("model.scheduler.warmup_epochs needs trainer.max_epochs to convert "
                         "epochs to steps")
    warmup = warmup_epochs * total_steps // max_epochs if warmup_epochs else 0
    if warmup >= total_steps:
        raise ValueError(f"model.scheduler.warmup_epochs={warmup_epochs} must be below "
                         f"trainer.max_epochs={max_epochs}")
    return WarmupCosineSchedule(optimizer, warmup_steps=warmup, t_total=total_steps,
                                warmup_multiplier=warmup_multiplier)
