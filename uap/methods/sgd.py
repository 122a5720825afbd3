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
minimises the cross-entropy to the target class for every image. The run's criterion
(:mod:`uap.criteria`) supplies the loss and which images count as fooled.

The loss (``loss``) is the clamped cross-entropy above by default; ``"logit"`` maximises
``−z_{k̂(x_i)}`` (the clean class's logit, unclamped) and ``"cw"`` the C&W margin
``min(max_{j≠k̂} z_j − z_{k̂}, β)`` (as DF-UAP, Zhang et al., CVPR 2020), each with its targeted
form (:data:`uap.criteria.ASCENT_LOSSES`).

Options (``method_options``): ``batch_size`` (32), ``step_size`` (0.1, a fraction of ε),
``decay`` (0.7 per pass), ``beta`` (10.0, the clamp; ``inf`` disables it), ``loss`` (``"ce"``,
``"logit"`` or ``"cw"``). The target class of a targeted run comes from :func:`uap.craft`'s
``target``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from uap.criteria import AscentLoss, clamped_cross_entropy
from uap.forward import logits_of
from uap.methods.ascent import Ascent, AscentOptions, Objective
from uap.methods.base import CraftContext, register_method
from uap.options import require

__all__ = ["SGD", "SGDOptions", "clamped_cross_entropy"]


@dataclass(frozen=True)
class SGDOptions(AscentOptions):
    """:class:`~uap.methods.ascent.AscentOptions` plus the ``loss`` and its clamp ``beta``."""

    beta: float = 10.0
    loss: AscentLoss = "ce"

    def check(self) -> None:
        super().check()
        require(self.beta > 0, f"beta must be a number > 0 (math.inf disables the clamp), got {self.beta!r}")


@register_method()
class SGD(Ascent):
    """SGD-UAP (module docstring), untargeted or targeted."""

    name = "sgd"
    Options = SGDOptions
    supports_target = True

    def objective(self, ctx: CraftContext) -> Objective:
        model, criterion, beta, loss = ctx.classifier, ctx.criterion, self.options.beta, self.options.loss

        def objective(x_adv: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = logits_of(model, x_adv)
            clean = ctx.clean[idx]
            return criterion.ascent_loss(logits, clean, beta, loss), criterion.reached(logits.detach(), clean)

        return objective
