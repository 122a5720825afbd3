"""Confidence intervals for rates measured on a finite held-out set: :func:`wilson_interval`.

A fooling rate measured on ~200 held-out photographs is uncertain by several points; a paper
table needs the interval beside it. The Wilson score interval (Wilson, JASA 1927) is the usual
choice for a binomial proportion: unlike the normal approximation ``p ± z·√(p(1−p)/n)`` it
stays inside [0, 1] and keeps close to its nominal coverage at small ``n`` and at rates near
0 or 1 (Brown, Cai & DasGupta, Statistical Science 2001).
"""
from __future__ import annotations

import math

__all__ = ["wilson_interval", "Z_95"]

#: The standard normal quantile of a two-sided 95 % interval.
Z_95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval ``(low, high)`` of a proportion ``successes / n``.

    ``z`` is the normal quantile (default: a two-sided 95 % interval). ``n = 0`` gives
    ``(nan, nan)``: nothing was measured.
    """
    for name, value in (("successes", successes), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a whole number ≥ 0, got {value!r}")
    if successes > n:
        raise ValueError(f"successes ({successes}) cannot exceed n ({n})")
    if not (isinstance(z, (int, float)) and z > 0 and math.isfinite(z)):
        raise ValueError(f"z must be a positive number, got {z!r}")
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the ends, not 1e-17 away
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high
