"""SGA: a universal perturbation by stochastic gradient aggregation.

Liu, Zhong, Zhang, Qin & Deng, "Enhancing generalization of universal adversarial perturbation
through gradient aggregation" (ICCV 2023). The paper finds that SGD-UAP
(:mod:`uap.methods.sgd`) generalises poorly to unseen images at either end of the batch size:
with small minibatches the gradient vanishes (few images, most of them past the loss clamp or
cancelling each other, leave a weak, noisy sign), with large ones ``v`` takes few coarse steps
and settles in a poor local optimum. SGA keeps the large minibatch for the update but computes
its direction from a short exploration with small ones::

    for each pass k, for each minibatch B (the pass's visiting order):
        w ← v, G ← 0
        repeat K times:                                      (K = inner_steps)
            for each inner minibatch b of B, in a fresh random order (|b| = inner_batch_size):
                g ← ∇_w mean_{i∈b} J(x_i, clip(x_i + w, 0, 1))
                G ← G + g
                w ← P_{p,ε}(w + γ_k · d_p(g))                 (inner sign step on the copy)
        v ← P_{p,ε}(v + α_k · d_p(G))                        (α_k = step_size·ε·decay^(k−1))

The inner steps move a copy ``w`` of ``v`` (the paper's inner pre-search), so each inner
gradient is taken where the previous small-batch steps led; the outer step follows the sum of
those gradients, which is more stable than any one of them, and whose sign loses less than the
sign of each (a smaller quantisation error). ``J`` is SGD-UAP's loss (``loss``: the clamped
cross-entropy on the clean predictions by default, clamped at ``beta``, or the logit / C&W
margin losses of :data:`uap.criteria.ASCENT_LOSSES`; targeted runs use each loss's targeted
form), and ``d_p`` is the sign for ℓ∞ and the normalised gradient otherwise
(:func:`uap.methods.ascent.ascent_direction`); ``γ_k = inner_step_size·ε·decay^(k−1)``.

With ``momentum`` μ > 0 the outer step follows ``m ← μ·m + G/‖G‖₁`` instead of ``G`` (the
paper's optional momentum term). The buffer starts at zero in each pass, and the inner
minibatches' order is drawn from the pass's seeded generator, so a pass depends only on ``v``,
the seed and the pass number: a resumed run is the uninterrupted one.

Cost: a pass computes ``K`` gradients per crafting image (SGD-UAP: one).

Options (``method_options``), the paper's settings by default: ``batch_size`` (250),
``inner_batch_size`` (10), ``inner_steps`` (K = 4), ``inner_step_size`` and ``step_size`` (0.1,
fractions of ε), ``decay`` (1.0: a constant step), ``momentum`` (0: none; the paper's is 0.9),
``loss`` (``"ce"``) and its clamp ``beta`` (9.0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from uap.methods.ascent import Objective, ascent_direction, gradient_rows, minibatch_gradient, step_length
from uap.methods.base import CraftContext, register_method
from uap.methods.sgd import SGD, SGDOptions
from uap.options import require

__all__ = ["SGA", "SGAOptions"]


@dataclass(frozen=True)
class SGAOptions(SGDOptions):
    """:class:`~uap.methods.sgd.SGDOptions` (with the paper's defaults) plus the inner loop:
    ``inner_batch_size`` images per inner step, ``inner_steps`` rounds over the minibatch, the
    inner step ``inner_step_size`` (a fraction of ε), and the outer ``momentum``."""

    batch_size: int = 250
    decay: float = 1.0
    beta: float = 9.0
    inner_batch_size: int = 10
    inner_steps: int = 4
    inner_step_size: float = 0.1
    momentum: float = 0.0

    def check(self) -> None:
        super().check()
        require(self.inner_batch_size >= 1, f"inner_batch_size must be an integer ≥ 1, got {self.inner_batch_size!r}")
        require(self.inner_steps >= 1, f"inner_steps must be an integer ≥ 1, got {self.inner_steps!r}")
        require(self.inner_step_size > 0 and math.isfinite(self.inner_step_size),
                f"inner_step_size must be a finite number > 0 (a fraction of eps), got {self.inner_step_size!r}")
        require(0 <= self.momentum <= 1, f"momentum must be in [0, 1] (0: none), got {self.momentum!r}")


@register_method()
class SGA(SGD):
    """Stochastic gradient aggregation (module docstring), untargeted or targeted."""

    name = "sga"
    Options = SGAOptions

    def run_pass(self, ctx: CraftContext) -> None:
        opts = self.options
        step = step_length(ctx, step_size=opts.step_size, decay=opts.decay)
        inner_step = step_length(ctx, step_size=opts.inner_step_size, decay=opts.decay)
        objective, rows = self.objective(ctx), gradient_rows(ctx) if self.splittable_for(ctx) else None
        velocity = torch.zeros_like(ctx.v)  # the momentum buffer: each pass starts afresh
        for idx in ctx.order.split(opts.batch_size):
            aggregated, fooled = self.aggregate(ctx, objective, idx, inner_step=inner_step, rows=rows)
            if opts.momentum > 0:
                l1 = aggregated.abs().sum()
                velocity = opts.momentum * velocity + (aggregated / l1 if l1 > 0 else aggregated)
                aggregated = velocity
            ctx.v = ctx.project(ctx.v.detach() + step * ascent_direction(aggregated, ctx.p))
            ctx.visited += idx.numel()
            ctx.updates += 1
            ctx.fooled_seen += fooled
            ctx.progress()

    def aggregate(self, ctx: CraftContext, objective: Objective, idx: torch.Tensor, *, inner_step: float,
                  rows: int | None) -> tuple[torch.Tensor, int]:
        """The inner loop on minibatch ``idx``: the sum of the inner gradients, and how many of
        its images were fooled when the first round visited them."""
        w, total, fooled_seen = ctx.v.detach(), torch.zeros_like(ctx.v), 0
        for round_index in range(self.options.inner_steps):
            shuffled = idx[torch.randperm(idx.numel(), generator=ctx.generator).to(idx.device)]
            for inner in shuffled.split(self.options.inner_batch_size):
                g, fooled = minibatch_gradient(ctx, objective, inner, w, rows=rows)
                total += g
                w = ctx.project(w + inner_step * ascent_direction(g, ctx.p))
                if round_index == 0 and fooled is not None:
                    fooled_seen += fooled
        return total, fooled_seen
