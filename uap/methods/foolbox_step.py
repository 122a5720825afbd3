"""``foolbox:<AttackName>``: any Foolbox minimisation attack as the inner step of Algorithm 1.

Algorithm 1 of Moosavi-Dezfooli et al. (CVPR 2017) only needs, for an image ``x_i + v`` that
is not fooled yet, *some* small ``Δv_i`` with ``k̂(x_i + v + Δv_i) ≠ k̂(x_i)``; the paper uses
DeepFool but notes that any minimal-perturbation attack fits. Foolbox 3 (Rauber et al., JOSS
2020) offers many — ``L2DeepFoolAttack``, ``LinfDeepFoolAttack``, ``L2CarliniWagnerAttack``,
``DDNAttack``, ``FMN`` variants, ``BoundaryAttack`` … — all as ``MinimizationAttack`` s. The
adapter wraps the target in ``fb.PyTorchModel(model, bounds=(0, 1))`` (the engine's pixel
space; normalisation stays inside the target) and calls the attack with ``epsilons=None``
(no budget: the minimal perturbation), with the Foolbox criterion of the run's own
(:mod:`uap.criteria`): misclassification *w.r.t. the clean prediction* ``k̂(x_i)``, or
``TargetedMisclassification(t)`` for a targeted run, for attacks that support it. Its step
is ``Δv_i = x_adv − clip(x_i + v, 0, 1)``; an update is
accepted only when Foolbox reports success, as the engine accepts only converged DeepFool.

Options (``method_options``): ``attack_options`` (keyword arguments of the attack class),
``batch_size`` (1 = Algorithm 1 exactly; > 1 attacks the unfooled images of a minibatch in
one Foolbox call), ``chunk_size``. A target class comes from :func:`uap.craft`'s ``target``;
without an accept rule of its own, any successful targeted step is taken. Foolbox's DeepFool
attacks default to the settings of the built-in ``deepfool`` method (``steps=50``,
``candidates=10``, ``overshoot=0.02``), so the two compare like for like; set them through
``attack_options``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from uap.criteria import Criterion
from uap.forward import model_device
from uap.methods.algorithm1 import Algorithm1, Algorithm1Options, InnerStep, StepResult
from uap.methods.base import CraftContext, register_method

__all__ = ["foolbox_attack", "FoolboxStep", "FoolboxMethod"]


def foolbox_attack(name: str, attack_options: dict[str, Any] | None = None) -> Any:
    """Instantiate the Foolbox minimisation attack ``fb.attacks.<name>``.

    ``ValueError`` for unknown names and for fixed-budget attacks (PGD, FGSM …), which do not
    return minimal perturbations and so cannot be Algorithm 1's inner step.
    """
    import foolbox as fb
    from foolbox.attacks.base import MinimizationAttack

    cls = getattr(fb.attacks, name, None) if name else None
    minimisation = sorted(
        n for n in dir(fb.attacks)
        if isinstance(getattr(fb.attacks, n), type) and issubclass(getattr(fb.attacks, n), MinimizationAttack)
    )
    if not isinstance(cls, type):
        raise ValueError(f"foolbox has no attack {name!r}; minimisation attacks: {', '.join(minimisation)}")
    if not issubclass(cls, MinimizationAttack):
        raise ValueError(
            f"foolbox.attacks.{name} is a fixed-budget attack; Algorithm 1 needs a minimisation attack: "
            f"{', '.join(minimisation)}"
        )
    try:
        return cls(**dict(attack_options or {}))
    except TypeError as e:
        raise ValueError(f"bad attack_options for foolbox.attacks.{name}: {e}") from None


class FoolboxStep(InnerStep):
    """The inner step backed by a Foolbox attack on ``model`` (the run's attacked classifier).

    ``labels`` are the clean predictions of the whole crafting set (indexed by ``idx``);
    ``criterion`` (:mod:`uap.criteria`) names the Foolbox criterion and the class each image
    must leave or reach.
    """

    def __init__(self, model: torch.nn.Module, attack: Any, labels: torch.Tensor, criterion: Criterion):
        import foolbox as fb

        self.fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0), device=model_device(model))
        self.attack = attack
        self.labels = labels
        self.criterion = criterion
        self.fb_criterion = getattr(fb.criteria, criterion.foolbox)

    def __call__(self, ctx: CraftContext, idx: torch.Tensor, logits: torch.Tensor,
                 lookahead: torch.Tensor | None) -> StepResult:
        xp = ctx.perturbed(idx).detach().contiguous()
        criterion = self.fb_criterion(self.criterion.labels(self.labels[idx]))
        _, adv, success = self.attack(self.fmodel, xp, criterion, epsilons=None)
        return StepResult((adv - xp).detach(), success.to(torch.bool))


@dataclass(frozen=True)
class FoolboxOptions(Algorithm1Options):
    """:class:`Algorithm1Options` plus ``attack_options``: keyword arguments of the attack class."""

    attack_options: dict = field(default_factory=dict)


@register_method("foolbox", prefix=True)
class FoolboxMethod(Algorithm1):
    """Algorithm 1 with ``foolbox.attacks.<Name>`` as the inner step (``method="foolbox:<Name>"``)."""

    name = "foolbox"
    Options = FoolboxOptions
    supports_target = True

    def __init__(self, options=None, *, name: str | None = None) -> None:
        super().__init__(options, name=name)
        self.attack_name = self.name.partition(":")[2]
        foolbox_attack(self.attack_name, self.options.attack_options)  # a bad name fails before crafting

    def inner_step(self, ctx: CraftContext) -> InnerStep:
        attack = foolbox_attack(self.attack_name, self.options.attack_options)
        return FoolboxStep(ctx.classifier, attack, ctx.clean, ctx.criterion)
