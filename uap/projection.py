"""Exact Euclidean projection onto ℓp balls: ``P_{p,ε}(v) = argmin_{‖v'‖_p ≤ ε} ‖v − v'‖₂``.

Algorithm 1 of Moosavi-Dezfooli et al. (CVPR 2017) keeps the universal perturbation inside
the ℓp ball of radius ε by projecting after every update. The projection must be the exact
Euclidean one:

- ℓ∞: element-wise clamp to ``[−ε, ε]``;
- ℓ2: rescale to radius ε *only when outside* (the original code's first version always
  rescaled, which inflates small perturbations onto the sphere — a known bug);
- ℓ1: the sort-based projection of Duchi et al., "Efficient projections onto the ℓ1-ball
  for learning in high dimensions" (ICML 2008): soft-threshold ``|v|`` by the θ that makes
  ``‖v'‖₁ = ε``.

This module also holds :func:`check_norm` and :func:`check_eps`, the one place where the
toolkit turns a user's ``p`` / ``ε`` into validated floats.
"""
from __future__ import annotations

import math

import torch

__all__ = ["project_lp", "check_norm", "check_eps", "lp_norm", "norm_name"]

_NORMS = {"inf": math.inf, "linf": math.inf, "infinity": math.inf, "∞": math.inf,
          "2": 2.0, "l2": 2.0, "1": 1.0, "l1": 1.0}


def check_norm(p: float | int | str) -> float:
    """Return ``p`` as a float in {1.0, 2.0, inf}; anything else is a ``ValueError``.

    Accepts numbers (``2``, ``math.inf``) and spellings like ``"inf"``, ``"linf"``, ``"l2"``.
    """
    if isinstance(p, str):
        value = _NORMS.get(p.strip().lower())
    elif isinstance(p, (int, float)) and not isinstance(p, bool):
        value = float(p) if float(p) in (1.0, 2.0, math.inf) else None
    else:
        value = None
    if value is None:
        raise ValueError(f"unknown norm {p!r}: use 1, 2 or inf")
    return value


def norm_name(p: float | int | str) -> str:
    """The canonical text for a norm: ``"inf"``, ``"2"`` or ``"1"`` (JSON has no ∞)."""
    p = check_norm(p)
    return "inf" if math.isinf(p) else str(int(p))


def check_eps(eps: float, p: float | int | str | None = None) -> float:
    """Return ``eps`` as a float; it must be finite and > 0, and for the ℓ∞ ball (``p`` = inf)
    at most 1: images live in [0, 1], so a larger ℓ∞ budget is a unit mistake (0–255)."""
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"eps must be a number, got {eps!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if p is not None and math.isinf(check_norm(p)) and value > 1:
        raise ValueError(f"an ℓ∞ eps is on the [0, 1] pixel scale (8/255 = 0.0314), got {value:.4g} > 1")
    return value


def lp_norm(v: torch.Tensor, p: float | int | str, *, batched: bool = False) -> torch.Tensor:
    """‖v‖_p of the whole tensor (a scalar), or of each row when ``batched``."""
    p = check_norm(p)
    flat = v.reshape(v.shape[0], -1) if batched else v.reshape(1, -1)
    out = torch.linalg.vector_norm(flat, ord=p, dim=1)
    return out if batched else out[0]


def project_lp(v: torch.Tensor, eps: float, p: float | int | str, *, batched: bool = False) -> torch.Tensor:
    """Euclidean projection of ``v`` onto ``{v' : ‖v'‖_p ≤ eps}``, for p ∈ {1, 2, inf}.

    The whole tensor is one vector (a universal perturbation is one C×H×W tensor); with
    ``batched=True`` each row ``v[i]`` is projected on its own. Points already inside the ball
    are returned unchanged (a copy). The result has ``v``'s shape, dtype and device.

    Examples:
        >>> v = torch.tensor([3.0, -4.0])
        >>> project_lp(v, 1.0, 2)          # scaled onto the sphere
        tensor([ 0.6000, -0.8000])
        >>> project_lp(v, 1.0, "inf")      # clamped
        tensor([ 1., -1.])
        >>> project_lp(v, 1.0, 1)          # soft-thresholded (Duchi et al. 2008)
        tensor([ 0., -1.])
    """
    p = check_norm(p)
    eps = check_eps(eps)
    if not torch.is_tensor(v) or not v.is_floating_point():
        raise ValueError("project_lp expects a floating-point tensor")
    if batched and v.dim() == 0:
        raise ValueError("batched projection needs a leading batch dimension")
    flat = v.reshape(v.shape[0], -1) if batched else v.reshape(1, -1)
    if math.isinf(p):
        out = flat.clamp(-eps, eps)
    elif p == 2.0:
        norms = torch.linalg.vector_norm(flat, ord=2, dim=1, keepdim=True)
        # Scale only rows outside the ball; inside rows get factor 1 exactly.
        factor = torch.where(norms > eps, eps / norms.clamp_min(torch.finfo(flat.dtype).tiny), torch.ones_like(norms))
        out = flat * factor
    else:
        out = _project_l1(flat, eps)
    return out.reshape(v.shape)


def _project_l1(flat: torch.Tensor, eps: float) -> torch.Tensor:
    """Row-wise ℓ1-ball projection (Duchi et al. 2008, Fig. 1), O(D log D) per row.

    With ``u = sort(|v|)`` descending and ``ρ = max{j : u_j − (Σ_{i≤j} u_i − ε)/j > 0}``,
    the threshold is ``θ = (Σ_{i≤ρ} u_i − ε)/ρ`` and the projection is
    ``sign(v)·max(|v| − θ, 0)``. Rows already inside the ball are left unchanged.
    """
    a = flat.abs()
    inside = a.sum(dim=1) <= eps
    if bool(inside.all()):
        return flat.clone()
    u, _ = torch.sort(a, dim=1, descending=True)
    css = u.cumsum(dim=1) - eps
    j = torch.arange(1, u.shape[1] + 1, device=flat.device, dtype=flat.dtype)
    cond = u - css / j > 0
    # ρ is the last index where cond holds (cond is true on a prefix; index 0 is always true
    # when the row is outside the ball because u_1 > u_1 − ε).
    rho = cond.to(torch.int64).cumsum(dim=1).argmax(dim=1, keepdim=True)
    theta = css.gather(1, rho) / (rho + 1).to(flat.dtype)
    out = flat.sign() * (a - theta).clamp_min(0)
    return torch.where(inside[:, None], flat, out)
