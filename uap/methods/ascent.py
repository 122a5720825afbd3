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
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from uap.baselines import random_perturbation
from uap.deepfool import GRADIENT_BUDGET
from uap.distributed import all_sum, is_distributed, shard, world
from uap.methods.algorithm1 import INNER_CALLS
from uap.methods.base import CraftContext, Method
from uap.options import Options, require

__all__ = [
    "ascent_direction", "step_length", "projected_ascent_pass", "minibatch_gradient", "gradient_rows", "random_start",
    "Objective", "Ascent", "AscentOptions",
]

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


@dataclass(frozen=True)
class AscentOptions(Options):
    """``batch_size`` images per step, ``step_size`` (a fraction of ε) and its ``decay`` per pass."""

    batch_size: int = 32
    step_size: float = 0.1
    decay: float = 0.7

    def check(self) -> None:
        require(self.batch_size >= 1, f"batch_size must be an integer ≥ 1, got {self.batch_size!r}")
        require(self.step_size > 0 and math.isfinite(self.step_size),
                f"step_size must be a finite number > 0 (a fraction of eps), got {self.step_size!r}")
        require(0 < self.decay <= 1, f"decay must be in (0, 1], got {self.decay!r}")


def step_length(ctx: CraftContext, *, step_size: float, decay: float) -> float:
    """``step_size · ε · decay^(pass − 1)``."""
    return float(step_size) * ctx.eps * float(decay) ** (ctx.pass_index - 1)


def random_start(ctx: CraftContext, init: float) -> None:
    """Move ``ctx.v`` off zero: if it is all zero, replace it by random noise of ℓp size
    ``init · ε`` drawn from the pass's seeded generator (so a resumed run draws the same).

    For objectives whose gradient vanishes at ``v = 0`` — a distance between clean and perturbed
    outputs has its minimum there — ascent from zero would never move.
    """
    if bool(ctx.v.any()):
        return
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator))
    noise = random_perturbation(tuple(ctx.v.shape), init * ctx.eps, ctx.p, seed=seed, dtype=ctx.v.dtype)
    ctx.v = ctx.project(noise.to(ctx.v.device))


class Ascent(Method):
    """Base of the projected-ascent methods: ``run_pass`` is :func:`projected_ascent_pass` on
    :meth:`objective`, with the pass's step length; ``Options`` derive from :class:`AscentOptions`."""

    Options = AscentOptions
    # Algorithm 1's column, always 0 here: the pass records of every built-in method have the same keys
    counters = (INNER_CALLS,)

    def objective(self, ctx: CraftContext) -> Objective:
        """The batch objective of this pass (called once per pass)."""
        raise NotImplementedError

    #: the objective is a mean of per-image terms, so a minibatch may be differentiated in parts
    splittable = True

    def run_pass(self, ctx: CraftContext) -> None:
        step = step_length(ctx, step_size=self.options.step_size, decay=self.options.decay)
        projected_ascent_pass(ctx, self.objective(ctx), batch_size=self.options.batch_size, step=step,
                              splittable=self.splittable_for(ctx))

    def splittable_for(self, ctx: CraftContext) -> bool:
        """Whether this pass's objective may be differentiated in parts of a minibatch."""
        return self.splittable


def projected_ascent_pass(
    ctx: CraftContext,
    objective: Objective,
    *,
    batch_size: int,
    step: float,
    splittable: bool = True,
) -> None:
    """One pass of minibatch projected steepest ascent on ``ctx.v``.

    ``objective(x_adv, idx)`` receives the perturbed images ``clip(x[idx] + v, 0, 1)`` (with
    the graph to ``v``) and returns ``(J, fooled)`` — the scalar to maximise, a mean over the
    images, and an optional bool mask of fooled images (counted in ``ctx.fooled_seen``). Each
    minibatch is one update.

    Memory: a minibatch larger than :data:`uap.deepfool.GRADIENT_BUDGET` input elements (13
    images at 224×224; CIFAR-size minibatches of up to 682 images are one part) is differentiated
    in parts of at most that size, whose gradients of the part means are summed weighted by the
    parts' sizes: the gradient of the whole minibatch's mean, with the memory of one part. An
    objective that is not a mean of per-image terms passes ``splittable=False``.

    Under ``torch.distributed`` each minibatch is split over the ranks; each rank takes the
    gradient of the mean over its share, the ranks sum those raw gradients weighted by their
    share's size and divide by the minibatch size (the gradient of the whole minibatch's
    mean), and every rank then takes the same step and projection, so all hold the same
    ``v``. ``batch_size`` is the global minibatch, whatever the number of ranks.
    """
    rows = gradient_rows(ctx) if splittable else None
    for idx in ctx.order.split(batch_size):
        v = ctx.v.detach()
        g, fooled = minibatch_gradient(ctx, objective, idx, v, rows=rows)
        ctx.v = ctx.project(v + step * ascent_direction(g, ctx.p))
        ctx.visited += idx.numel()
        ctx.updates += 1
        if fooled is not None:
            ctx.fooled_seen += fooled
        ctx.progress()


def gradient_rows(ctx: CraftContext) -> int:
    """The most images one backward pass takes (:data:`uap.deepfool.GRADIENT_BUDGET` input elements)."""
    return max(1, GRADIENT_BUDGET // ctx.x[0].numel())


def minibatch_gradient(
    ctx: CraftContext,
    objective: Objective,
    idx: torch.Tensor,
    v: torch.Tensor,
    *,
    rows: int | None,
) -> tuple[torch.Tensor, int | None]:
    """``∇_v J`` of the minibatch ``idx`` at ``v`` (the mean over its images), and how many of
    them the objective counts as fooled (None when it does not say).

    ``rows`` (None: no limit) caps the images of one backward pass: a larger minibatch is
    differentiated in parts whose gradients are summed weighted by the parts' sizes. Under
    ``torch.distributed`` each rank differentiates its share of ``idx`` and the ranks combine
    the shares' gradients into the whole minibatch's, so every rank returns the same gradient
    and count (see :func:`projected_ascent_pass`).
    """
    distributed = is_distributed()
    mine = idx[shard(idx.numel())] if distributed and idx.numel() >= world()[1] else idx
    v = v.detach().requires_grad_(True)
    g, masks = torch.zeros_like(v), []
    for part in mine.split(rows) if rows is not None and mine.numel() > rows else (mine,):
        with torch.enable_grad():  # the mean's gradient, summed over parts weighted by their size
            x_adv = (ctx.x[part] + v).clamp(0.0, 1.0)
            value, fooled = objective(x_adv, part)
            (gp,) = torch.autograd.grad(value, v)
        g = gp if part is mine else g + gp * (part.numel() / mine.numel())
        masks.append(fooled)
    if mine is not idx:  # the mean gradient of the whole minibatch, from every rank's share
        g = all_sum(g * mine.numel()) / idx.numel()
    if masks[0] is None:
        return g, None
    fooled = torch.cat(masks).sum()
    return g, int(all_sum(fooled) if mine is not idx else fooled)
