"""Learning-rate schedule: linear warm-up, then cosine (like open_clip_train/scheduler.py), with an
optional time budget that anneals by max(step progress, time progress)."""
from __future__ import annotations

import math
from typing import Callable


def assign_learning_rate(optimizer, new_lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = new_lr


def lr_factor(step: int, elapsed: float, warmup_steps: int, total_steps: int, budget_s: float | None) -> float:
    """Linear warm-up, then cosine over max(step progress, time progress) when a time budget is set,
    so a run on a busy machine still anneals fully before its deadline."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    prog = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if budget_s:
        prog = max(prog, elapsed / budget_s)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))


def cosine_lr(optimizer, base_lr: float, warmup_steps: int, total_steps: int,
              budget_s: float | None = None) -> Callable[[int, float], float]:
    """adjust(step, elapsed seconds) -> the learning rate it set on `optimizer`."""
    def adjust(step: int, elapsed: float) -> float:
        lr = base_lr * lr_factor(step, elapsed, warmup_steps, total_steps, budget_s)
        assign_learning_rate(optimizer, lr)
        return lr

    return adjust
