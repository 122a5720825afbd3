"""Cos-UAP: a label-free universal perturbation that turns the logits away from their clean direction.

Zhang, Benz, Karjauv & Kweon, "Data-free universal adversarial perturbation and black-box
attack" (ICCV 2021): instead of a cross-entropy against some labels, minimise the
cosine similarity between the logit vectors of the clean and the perturbed image::

    for each pass k, for each minibatch B (the pass's visiting order):
        g ← ∇_v  mean_{i∈B} −cos(f(x_i), f(clip(x_i + v, 0, 1)))
        v ← P_{p,ε}(v + α_k · d_p(g))                 (α_k = step_size·ε·decay^(k−1))

Why: the loss needs no label and no clean prediction — only the model's own logits — so it
works on any images, even proxy data unrelated to the training set (the paper's data-free
setting), and it does not saturate the way a clamped cross-entropy does: an image keeps
contributing until its logits point the other way, in line with the paper's view of a UAP as a
pattern that dominates the logits of every image rather than one that merely pushes each image
across its nearest boundary. It is
the classifier-side counterpart of :mod:`uap.methods.feature`, which takes the same distance
on an encoder's features; the minimised quantity is reported as ``1 − cos`` (the same gradient).

The similarity is at its maximum at ``v = 0``, where its gradient vanishes, so a pass that
starts from ``v = 0`` first draws a random start of ℓp size ``init · ε`` from the pass's seeded
generator (:func:`uap.methods.ascent.random_start`). The loop, the exact projection and the step
schedule are SGD-UAP's (:mod:`uap.methods.ascent`); the live progress counts an image as fooled
when its prediction differs from the clean one. Untargeted only.

Options (``method_options``): ``batch_size`` (32), ``step_size`` (0.1, a fraction of ε),
``decay`` (0.7 per pass), ``init`` (0.25, the random start's size as a fraction of ε).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from uap.forward import logits_of
from uap.methods.ascent import Ascent, AscentOptions, Objective, random_start
from uap.methods.base import CraftContext, register_method
from uap.methods.feature import embedding_distance
from uap.options import require

__all__ = ["CosUAP", "CosUAPOptions"]


@dataclass(frozen=True)
class CosUAPOptions(AscentOptions):
    """:class:`~uap.methods.ascent.AscentOptions` plus the size of the random start, ``init``
    (a fraction of ε)."""

    init: float = 0.25

    def check(self) -> None:
        super().check()
        require(0 < self.init <= 1, f"init must be in (0, 1] (a fraction of eps), got {self.init!r}")


@register_method()
class CosUAP(Ascent):
    """Cos-UAP (module docstring)."""

    name = "cos-uap"
    Options = CosUAPOptions

    def objective(self, ctx: CraftContext) -> Objective:
        model, criterion = ctx.classifier, ctx.criterion
        random_start(ctx, self.options.init)

        def objective(x_adv: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                clean = logits_of(model, ctx.x[idx])
            logits = logits_of(model, x_adv)
            return embedding_distance(clean, logits, "cosine"), criterion.reached(logits.detach(), ctx.clean[idx])

        return objective
