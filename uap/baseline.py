"""Random-noise baseline: a random perturbation with the same ℓp norm as a crafted UAP.

Moosavi-Dezfooli et al. (CVPR 2017, §3 and Table 2 discussion) compare universal
perturbations with *random* perturbations of the same norm: random noise of that size barely
changes predictions, so whatever fooling a UAP achieves beyond the random row is due to its
universal structure, not to its size. :func:`random_perturbation` draws that noise:

- ``p = ∞``: uniform random signs × ε. Every pixel sits at ±ε, so ``‖r‖∞ = ε`` exactly and the
  noise also uses the whole box — the same "saturated" shape ℓ∞ UAPs take after projection
  (most of their pixels end at ±ε), which makes it the fair, strongest-at-that-norm random
  comparison. Uniform noise in ``[-ε, ε]`` would have the same ‖·‖∞ but far less energy.
- ``p = 2``: a Gaussian vector rescaled to ``‖r‖2 = ε`` — a uniformly random direction on the
  ℓ2 sphere (the paper's random baseline).
- ``p = 1``: i.i.d. Laplace entries rescaled to ``‖r‖1 = ε`` — uniform on the ℓ1 sphere
  (normalised exponentials are uniform on the simplex; the random signs spread it over all
  orthants).

The draw is seeded with its own ``torch.Generator`` so it is reproducible and does not touch
the global RNG.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["random_perturbation"]


def random_perturbation(
    shape: Sequence[int],
    eps: float,
    p: float = math.inf,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A random perturbation of ``shape`` (e.g. C×H×W) with ``‖r‖p = eps`` exactly.

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
    shape = tuple(int(s) for s in shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"shape must be non-empty with positive sizes, got {shape}")
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    gen = torch.Generator().manual_seed(int(seed))
    if p == math.inf:
        signs = torch.randint(0, 2, shape, generator=gen, dtype=torch.int64) * 2 - 1
        return signs.to(dtype) * eps
    if p == 2:
        r = torch.randn(shape, generator=gen, dtype=torch.float64)
        return (r * (eps / r.norm())).to(dtype)
    if p == 1:
        u = torch.rand(shape, generator=gen, dtype=torch.float64).clamp_min(1e-300)
        signs = torch.randint(0, 2, shape, generator=gen, dtype=torch.int64) * 2 - 1
        r = -torch.log(u) * signs  # Laplace(0, 1)
        return (r * (eps / r.abs().sum())).to(dtype)
    raise ValueError(f"p must be inf, 2 or 1, got {p!r}")
