"""Noise baselines: ``random`` (random signs × ε for ℓ∞, a random direction on the sphere for
ℓ2 and ℓ1) and ``gaussian`` (i.i.d. Gaussian noise rescaled to the budget).

``random`` is the random row of Moosavi-Dezfooli et al. (CVPR 2017, §3). Every draw is seeded
with its own ``torch.Generator``, so it is reproducible and leaves the global RNG alone.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from uap.baselines.base import (
    Baseline,
    BaselineContext,
    _check_budget,
    _check_shape,
    _to_norm,
    register_baseline,
)

__all__ = ["random_perturbation", "gaussian_perturbation", "Random", "Gaussian"]


def random_perturbation(
    shape: Sequence[int],
    eps: float,
    p: float = math.inf,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A random perturbation of ``shape`` (e.g. C×H×W) with ``‖r‖p = eps`` exactly.

    - ``p = ∞``: uniform random signs × ε. Every pixel sits at ±ε, so the noise uses the whole
      box — the "saturated" shape ℓ∞ UAPs take after projection, which makes it the fair,
      strongest-at-that-norm random comparison (uniform noise in ``[-ε, ε]`` has the same
      ‖·‖∞ but far less energy).
    - ``p = 2``: a Gaussian vector rescaled to ``‖r‖2 = ε`` — a uniformly random direction.
    - ``p = 1``: i.i.d. Laplace entries rescaled to ``‖r‖1 = ε`` — uniform on the ℓ1 sphere
      (normalised exponentials are uniform on the simplex; random signs spread them over
      every orthant).

    Args:
        shape: shape of the perturbation, usually one image's ``C×H×W``.
        eps: the norm to match (the crafted UAPs' budget ε), > 0.
        p: ``inf``, ``2`` or ``1``.
        seed: seeds a private generator; same seed, same noise.
        dtype: floating dtype of the result.

    Examples:
        >>> r = random_perturbation((3, 32, 32), 8 / 255, float("inf"), seed=0)
        >>> bool(torch.all(r.abs() == torch.tensor(8 / 255)))
        True
    """
    shape = _check_shape(shape)
    eps, p = _check_budget(eps, p)
    gen = torch.Generator().manual_seed(int(seed))
    if p == math.inf:
        signs = torch.randint(0, 2, shape, generator=gen, dtype=torch.int64) * 2 - 1
        return signs.to(dtype) * eps
    if p == 2:
        return _to_norm(torch.randn(shape, generator=gen, dtype=torch.float64), eps, p, dtype)
    u = torch.rand(shape, generator=gen, dtype=torch.float64).clamp_min(1e-300)
    signs = torch.randint(0, 2, shape, generator=gen, dtype=torch.int64) * 2 - 1
    return _to_norm(-torch.log(u) * signs, eps, p, dtype)  # Laplace(0, 1)


def gaussian_perturbation(
    shape: Sequence[int],
    eps: float,
    p: float = math.inf,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """I.i.d. standard Gaussian noise of ``shape`` rescaled to ``‖r‖p = eps`` exactly.

    For ℓ2 this is the same distribution as :func:`random_perturbation`; for ℓ∞ and ℓ1 it is
    the "natural noise" comparison (a Gaussian scaled so its largest pixel, or its ℓ1 mass,
    meets the budget), weaker than random signs at the same ‖·‖∞.
    """
    shape = _check_shape(shape)
    eps, p = _check_budget(eps, p)
    gen = torch.Generator().manual_seed(int(seed))
    return _to_norm(torch.randn(shape, generator=gen, dtype=torch.float64), eps, p, dtype)


@register_baseline()
class Random(Baseline):
    """Random signs × ε for ℓ∞, a uniformly random direction for ℓ2 and ℓ1 (:func:`random_perturbation`)."""

    name = "random"

    def make(self, variant: str, ctx: BaselineContext) -> torch.Tensor:
        return random_perturbation(ctx.shape, ctx.eps, ctx.p, seed=ctx.seed)


@register_baseline()
class Gaussian(Baseline):
    """I.i.d. Gaussian noise rescaled to the budget (:func:`gaussian_perturbation`)."""

    name = "gaussian"

    def make(self, variant: str, ctx: BaselineContext) -> torch.Tensor:
        return gaussian_perturbation(ctx.shape, ctx.eps, ctx.p, seed=ctx.seed)
