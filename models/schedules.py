"""Schedules as pure functions of the step: learning rate, EMA momentum, teacher temperature.

Pure functions of ``(step, max_steps)`` make training resumable by construction (the schedule
needs no state of its own) and trivial to test against closed forms.
"""
from __future__ import annotations

import math

__all__ = ["cosine_schedule", "warmup_cosine_schedule", "linear_warmup"]


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
