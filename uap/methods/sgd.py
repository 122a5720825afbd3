"""SGD-UAP: a universal perturbation by minibatch projected gradient ascent.

Shafahi, Najibi, Xu, Dickerson, Davis & Goldstein, "Universal adversarial training"
(AAAI 2020), Algorithm 1: instead of Algorithm 1 of Moosavi-Dezfooli et al. (an inner
DeepFool per image), maximise the average loss of the perturbed images directly::

    for each pass k, for each minibatch B (the pass's visiting order):
        g ← ∇_v  mean_{i∈B} min(CE(f(clip(x_i + v)), k̂(x_i)), β)
        v ← P_{p,ε}(v + α_k · d_p(g))                 (α_k = step_size·ε·decay^(k−1))

- The cross-entropy is taken against the **clean predictions** ``k̂(x_i)`` (the fooling-rate
  criterion), not the labels.
- It is clamped at ``β`` (the paper's ``ℓ̂ = min(ℓ, β)``): an image already pushed far across
  the boundary stops contributing, so the batch gradient is driven by the images that are
  not fooled yet instead of by a few outliers with huge loss.
- ``d_p`` is the sign of the gradient for ℓ∞ (sign-gradient ascent) and the ℓ2-normalised
  gradient otherwise (:func:`uap.methods.ascent.ascent_direction`); ``P_{p,ε}`` is the exact
  projection :func:`uap.project_lp`, so any p works.

Targeted (``target=t``): the objective becomes ``−CE(f(clip(x_i + v)), t)`` — the ascent
minimises the cross-entropy to the target class for every image.

Options (``method_options``): ``batch_size`` (32), ``step_size`` (0.1, a fraction of ε),
``decay`` (0.7 per pass), ``beta`` (10.0, the clamp; ``inf`` disables it), ``target``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from uap.methods.ascent import projected_ascent_pass, step_length
from uap.methods.targeted import target_of
from uap.forward import logits_of
from uap.universal import CraftContext, register_method

__all__ = ["sgd_uap_pass", "clamped_cross_entropy", "SGD_DEFAULTS"]

SGD_DEFAULTS = {"batch_size": 32, "step_size": 0.1, "decay": 0.7, "beta": 10.0}


def clamped_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """``mean_i min(CE(logits_i, labels_i), β)`` — Shafahi et al.'s clamped loss ``ℓ̂``."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    return ce.clamp(max=beta).mean()


@register_method("sgd")
def sgd_uap_pass(ctx: CraftContext) -> None:
    """One pass of SGD-UAP (module docstring), untargeted or targeted."""
    unknown = set(ctx.options) - set(SGD_DEFAULTS) - {"target"}
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for method 'sgd'; known: {sorted(SGD_DEFAULTS) + ['target']}")
    opts = {**SGD_DEFAULTS, **ctx.options}
    beta = opts["beta"]
    if not (isinstance(beta, (int, float)) and beta > 0):
        raise ValueError(f"beta must be a number > 0 (math.inf disables the clamp), got {beta!r}")
    target = target_of(ctx)
    step = step_length(ctx, step_size=opts["step_size"], decay=opts["decay"])

    def objective(x_adv: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits_of(ctx.model, x_adv)
        clean = ctx.clean[idx]
        fooled = logits.detach().argmax(dim=1) != clean
        if target is None:
            return clamped_cross_entropy(logits, clean, beta), fooled
        return -F.cross_entropy(logits, torch.full_like(clean, target)), fooled

    projected_ascent_pass(ctx, objective, batch_size=opts["batch_size"], step=step)
