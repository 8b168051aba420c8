"""Pure step -> float schedules: linear warm-up + cosine learning rate, cosine EMA momentum.

Every function here is a pure function of the step, so a resumed run recomputes exactly the values a straight
run would have used: the only scheduler state a checkpoint needs is the step itself.
"""

from __future__ import annotations

import math


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from `start` at step 0 to `end` at step `total_steps` (clamped beyond)."""
    if total_steps <= 0:
        return end
    progress = min(max(step / total_steps, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def learning_rate(step: int, *, peak_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from 0 to `peak_lr` over `warmup_steps`, then cosine down to `min_lr` at `total_steps`.

    This is the DINO/UNIC `cosine_scheduler` evaluated at one step: step 0 of the warm-up uses lr 0 as the
    official code does, and the cosine part spans the steps left after the warm-up.
    """
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak_lr, min_lr)


def ema_momentum(step: int, *, total_steps: int, start: float = 1.0, end: float = 0.001) -> float:
    """Momentum of the teacher-feature standardisation EMA (UNIC paper Sec. 3.3).

    The official UNIC defaults (`--tnorm_ema_momentum_start 1.0`, `--tnorm_ema_momentum_end 0.001`, no warm-up)
    weight the new batch by `momentum`: 1.0 on the first step (the statistics are the first batch's), then
    ever slower updates as the statistics settle.
    """
    return cosine(step, total_steps, start, end)


def default_warmup_steps(total_steps: int) -> int:
    """5% of training, the official recipe's 10 warm-up epochs out of 200."""
    return max(1, round(0.05 * total_steps)) if total_steps > 1 else 0
