"""Schedules as pure functions of the step: learning rate, EMA momentum, teacher temperature.

Pure functions of ``(step, max_steps)`` make training resumable by construction (the schedule
needs no state of its own) and trivial to test against closed forms.
"""
from __future__ import annotations

import math

__all__ = ["cosine_schedule", "warmup_cosine_schedule", "linear_warmup", "triangular_schedule"]


def cosine_schedule(step: int, max_steps: int, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` (step 0) to ``end`` (step ``max_steps``).

    Used for BYOL/DINO's EMA momentum (``m`` from 0.996 to 1, Grill et al. 2020 §3.2) and for
    cosine learning-rate decay (Loshchilov & Hutter, SGDR). Steps past the end return ``end``.

    Examples:
        >>> cosine_schedule(0, 10, 0.996, 1.0)
        0.996
        >>> cosine_schedule(10, 10, 0.996, 1.0)
        1.0
    """
    if max_steps <= 0:
        raise ValueError(f"max_steps must be > 0, got {max_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    t = min(step, max_steps) / max_steps
    return end - (end - start) * (math.cos(math.pi * t) + 1) / 2


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear ramp from ``start`` to ``end`` over ``warmup_steps``; ``end`` afterwards."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def warmup_cosine_schedule(step: int, max_steps: int, warmup_steps: int, peak: float, end: float = 0.0) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then cosine decay to ``end``
    at ``max_steps`` (the learning-rate schedule of SimCLR, BYOL and DINO)."""
    if warmup_steps >= max_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be < max_steps ({max_steps})")
    if step < warmup_steps:
        return peak * step / warmup_steps
    return cosine_schedule(step - warmup_steps, max_steps - warmup_steps, peak, end)


def triangular_schedule(step: int, max_steps: int, warmup_steps: int, peak: float, start: float = 0.2) -> float:
    """Linear from ``start · peak`` (step 0) up to ``peak`` at ``warmup_steps``, then linear down to 0
    at ``max_steps``: the short triangular schedule of airbench (Jordan 2024; ``start = 0.2``,
    warm-up over the first fifth of the run).

    Examples:
        >>> triangular_schedule(0, 10, 2, 1.0), triangular_schedule(2, 10, 2, 1.0), triangular_schedule(6, 10, 2, 1.0)
        (0.2, 1.0, 0.5)
    """
    if not 0 <= warmup_steps < max_steps:
        raise ValueError(f"need 0 <= warmup_steps < max_steps, got {warmup_steps}, {max_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return peak * (start + (1 - start) * step / warmup_steps)
    return peak * max(0.0, (max_steps - step) / (max_steps - warmup_steps))
