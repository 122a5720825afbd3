"""Universal adversarial training: the supervised recipe against one universal perturbation δ.

Shafahi, Najibi, Xu, Dickerson, Davis & Goldstein, "Universal adversarial training" (AAAI
2020): a network that has to classify ``x + δ`` for the *current* universal perturbation δ,
while δ keeps climbing the network's loss, learns to resist universal perturbations at a small
fraction of per-image adversarial training's cost (one δ for the whole run, no inner attack per
image). Per minibatch B:

    δ ← P_{p,ε}(δ + α · d_p(∇_δ Σ_{i∈B} min(CE(f(clip(x_i + δ)), y_i), β)))      (ascent)
    θ ← θ − η ∇_θ [w · CE(f(clip(x + δ)), y) + (1 − w) · CE(f(x), y)]          (descent)

``d_p`` is the sign for ℓ∞ and the ℓ2-normalised gradient for ℓ2
(:func:`uap.methods.ascent.ascent_direction`), ``P`` the exact projection, ``β`` the clamp of
SGD-UAP (an image already misclassified stops steering δ). With ``free=True`` both gradients
come from one backward pass (the paper's "simultaneous" variant; δ then moves after the
network's step, from the gradient at the δ the network trained on), which costs one forward
and backward per minibatch instead of two.

δ is a buffer of the method, so it is in every checkpoint and a resumed run continues from the
same δ. Under ``torch.distributed`` δ's gradient is summed over the ranks (the loss is a sum
over the rows, so the sum is the global batch's gradient) and every rank takes the same step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from models.augment import random_crop_flip
from models.methods.base import register_training_method
from models.methods.supervised import Supervised, SupervisedOptions
from uap.distributed import all_sum
from uap.methods.ascent import ascent_direction
from uap.options import require
from uap.projection import check_norm, project_lp

__all__ = ["UAT", "UATOptions"]


@dataclass(frozen=True)
class UATOptions(SupervisedOptions):
    """:class:`~models.methods.supervised.SupervisedOptions` plus δ's budget ``eps`` in norm
    ``norm`` (``"inf"`` or ``"2"``), its step ``step_size`` (a fraction of ε), the clamp ``beta``,
    the weight ``adv_weight`` of the loss on ``x + δ`` (the rest on clean ``x``), ``free`` (one
    backward for both) and the ``image_size`` δ has."""

    eps: float = 10 / 255
    norm: str = "inf"
    step_size: float = 0.25
    beta: float = 10.0
    adv_weight: float = 1.0
    free: bool = False
    image_size: int = 32

    def check(self) -> None:
        super().check()
        require(self.eps > 0 and math.isfinite(self.eps), f"eps must be a number > 0, got {self.eps!r}")
        require(str(self.norm) in ("inf", "2"), f"norm must be 'inf' or '2', got {self.norm!r}")
        require(self.step_size > 0, f"step_size must be > 0, got {self.step_size!r}")
        require(self.beta > 0, f"beta must be > 0, got {self.beta!r}")
        require(0.0 <= self.adv_weight <= 1.0, f"adv_weight must be in [0, 1], got {self.adv_weight!r}")
        require(self.image_size >= 1, f"image_size must be ≥ 1, got {self.image_size!r}")


@register_training_method()
class UAT(Supervised):
    """Supervised training on ``x + δ`` for a universal δ that ascends the loss (module docstring)."""

    name = "uat"
    Options = UATOptions

    def __init__(self, backbone: nn.Module, options: Mapping[str, Any] | UATOptions | None = None, **hparams: Any):
        super().__init__(backbone, options, **hparams)
        o = self.options
        self.p = check_norm(o.norm)
        self.register_buffer("delta", torch.zeros(3, o.image_size, o.image_size))
        self._leaf: torch.Tensor | None = None

    def _step_delta(self, grad: torch.Tensor) -> None:
        """δ ← P(δ + α d_p(g)) with ``g`` summed over the ranks."""
        o = self.options
        g = all_sum(grad.detach())
        self.delta.copy_(project_lp(self.delta + o.step_size * o.eps * ascent_direction(g, self.p), o.eps, self.p))

    def _loss(self, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        w = self.options.adv_weight
        loss = w * F.cross_entropy(self((x + delta).clamp(0, 1)), y, label_smoothing=self.label_smoothing)
        if w < 1.0:
            loss = loss + (1 - w) * F.cross_entropy(self(x), y, label_smoothing=self.label_smoothing)
        return loss

    def training_step(self, x: torch.Tensor, y: torch.Tensor, step: int, max_steps: int) -> torch.Tensor:
        x = random_crop_flip(x, self.padding)
        if tuple(x.shape[1:]) != tuple(self.delta.shape):
            raise ValueError(f"uat's δ is {tuple(self.delta.shape)} but the images are {tuple(x.shape[1:])}; "
                             "set the image_size option")
        if self.options.free:
            self._leaf = self.delta.detach().clone().requires_grad_(True)
            return self._loss(x, y, self._leaf)  # δ's gradient arrives with the network's (after_step)
        leaf = self.delta.detach().clone().requires_grad_(True)
        ce = F.cross_entropy(self((x + leaf).clamp(0, 1)), y, reduction="none")
        (grad,) = torch.autograd.grad(ce.clamp(max=self.options.beta).sum(), leaf)
        with torch.no_grad():
            self._step_delta(grad)
        return self._loss(x, y, self.delta)

    def after_step(self, step: int, max_steps: int) -> None:
        if self._leaf is not None and self._leaf.grad is not None:
            with torch.no_grad():
                self._step_delta(self._leaf.grad)
        self._leaf = None

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """δ's size after the epoch (its ℓ∞ and ℓ2 norms) for the epoch's record."""
        metrics = super().on_epoch_end(epoch)
        metrics.update(delta_linf=float(self.delta.abs().max()), delta_l2=float(self.delta.norm()))
        return metrics
