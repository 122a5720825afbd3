"""Projected steepest ascent on a universal perturbation, one minibatch per step.

The optimisation-based UAPs (SGD-UAP of Shafahi et al., AAAI 2020; the label-free feature
UAPs) share one loop and differ only in the objective they maximise::

    for B in minibatches of the pass's visiting order:
        g ← ∇_v  mean_{i∈B} J(x_i, clip(x_i + v, 0, 1))
        v ← P_{p,ε}(v + α_k · d_p(g))

``d_p`` is the steepest-ascent direction of unit size in the ball's geometry
(:func:`ascent_direction`) and ``α_k = step_size · ε · decay^(k−1)`` decays once per pass
``k`` (step decay), so every pass of a resumed run uses the same step as an uninterrupted one.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch

from uap.universal import CraftContext

__all__ = ["ascent_direction", "step_length", "projected_ascent_pass", "Objective"]

#: ``objective(x_adv, idx) -> (J, fooled)``: the batch objective to
#: maximise (a scalar, already averaged) and, optionally, which images count as fooled
#: (a bool mask for the live progress display, or None).
Objective = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, Optional[torch.Tensor]]]


def ascent_direction(g: torch.Tensor, p: float) -> torch.Tensor:
    """The unit steepest-ascent direction for gradient ``g`` in the ℓp geometry.

    - ℓ∞: ``sign(g)`` (``argmax_{‖d‖∞≤1} ⟨g, d⟩``, the sign-gradient / FGSM step);
    - ℓ2 and ℓ1: ``g / ‖g‖₂``. For ℓ1 the exact steepest direction moves a single pixel per
      step, which makes progress painfully slow; the ℓ2 direction followed by the exact ℓ1
      projection (soft-thresholding) gives sparse perturbations at a usable speed.

    A zero gradient gives a zero direction (no step).
    """
    if math.isinf(p):
        return g.sign()
    norm = torch.linalg.vector_norm(g)
    return g / norm if norm > 0 else torch.zeros_like(g)


def step_length(ctx: CraftContext, *, step_size: float, decay: float) -> float:
    """``step_size · ε · decay^(pass − 1)`` after validating both knobs."""
    if not (isinstance(step_size, (int, float)) and step_size > 0 and math.isfinite(step_size)):
        raise ValueError(f"step_size must be a finite number > 0 (a fraction of eps), got {step_size!r}")
    if not (isinstance(decay, (int, float)) and 0 < decay <= 1):
        raise ValueError(f"decay must be in (0, 1], got {decay!r}")
    return float(step_size) * ctx.eps * float(decay) ** (ctx.pass_index - 1)


def projected_ascent_pass(
    ctx: CraftContext,
    objective: Objective,
    *,
    batch_size: int,
    step: float,
) -> None:
    """One pass of minibatch projected steepest ascent on ``ctx.v``.

    ``objective(x_adv, idx)`` receives the perturbed images ``clip(x[idx] + v, 0, 1)`` (with
    the graph to ``v``) and returns ``(J, fooled)`` — the scalar to maximise and an optional
    bool mask of fooled images (counted in ``ctx.fooled_seen``). Each minibatch is one update.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer ≥ 1, got {batch_size!r}")
    for idx in ctx.order.split(batch_size):
        v = ctx.v.detach().requires_grad_(True)
        with torch.enable_grad():
            x_adv = (ctx.x[idx] + v).clamp(0.0, 1.0)
            value, fooled = objective(x_adv, idx)
            (g,) = torch.autograd.grad(value, v)
        ctx.v = ctx.project(v.detach() + step * ascent_direction(g, ctx.p))
        ctx.visited += idx.numel()
        ctx.updates += 1
        if fooled is not None:
            ctx.fooled_seen += int(fooled.sum())
        ctx.progress()
