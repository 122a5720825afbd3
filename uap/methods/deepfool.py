"""DeepFool as Algorithm 1's inner step: ``deepfool``, ``deepfool-batched``, ``deepfool-targeted``.

- ``"deepfool"`` — Algorithm 1 as in the paper: same visiting order for a seed, same accept
  rule (update only when k̂(x_i+v) = k̂(x_i) and DeepFool converged), one image at a time.
- ``"deepfool-batched"`` — the same loop with minibatch inner steps (``batch_size`` 32): one
  batched DeepFool call on the unfooled images of each minibatch (see
  :mod:`uap.methods.algorithm1` for how that differs from Algorithm 1).
- targeted (``target=t``, any of them; ``"deepfool-targeted"`` is ``"deepfool"`` that insists
  on a target): DeepFool towards ``t`` (:func:`uap.deepfool` with ``target``), on images not
  yet predicted as ``t``, and an update is accepted only if, *after projection*, it raises
  the image's target margin ``z_t − max_{j≠t} z_j``. A projected step can undo the DeepFool
  step; accepting it anyway is how targeted UAPs end up as noise that fools but does not
  target. The stop rule then reads the targeted success rate.

DeepFool's settings (``norm``: the step's geometry, ℓ2 as in Algorithm 1; ``candidates`` 10;
``overshoot`` 0.02; ``max_iter`` 50; ``precision`` ``"fp32"`` or ``"bf16"``) are options of
these methods, beside Algorithm 1's (``method_options={"overshoot": 0.05, "precision": "bf16"}``);
the precision the gradients really ran in (bf16 falls back to fp32 where it would be slower) is
recorded in the result's ``extra["deepfool"]``. Every step attacks ``ctx.classifier`` (the
batch-norm-folded copy).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from uap.deepfool import DeepFoolOptions, deepfool, effective_precision
from uap.methods.algorithm1 import Algorithm1, Algorithm1Options, InnerStep, StepResult, _Lookahead
from uap.methods.base import CraftContext, register_method
from uap.projection import norm_name

__all__ = ["DeepFool", "DeepFoolBatched", "DeepFoolTargeted", "DeepFoolStep", "DeepFoolMethodOptions"]


@dataclass(frozen=True)
class DeepFoolMethodOptions(DeepFoolOptions, Algorithm1Options):
    """Algorithm 1's options (:class:`Algorithm1Options`) and DeepFool's
    (:class:`uap.deepfool.DeepFoolOptions`: the step's ``norm``, ``candidates``, ``overshoot``,
    ``max_iter``, ``precision``)."""

    def check(self) -> None:
        Algorithm1Options.check(self)
        DeepFoolOptions.check(self)

    def deepfool(self) -> dict[str, Any]:
        """The keyword arguments of :func:`uap.deepfool` these options set."""
        return {name: getattr(self, name) for name in DeepFoolOptions.__dataclass_fields__}


class DeepFoolStep(InnerStep):
    """DeepFool on ``clip(x[idx] + v)``, towards what the run's criterion counts as success."""

    def __init__(self, ctx: CraftContext, settings: dict[str, Any]) -> None:
        self.criterion, self.settings = ctx.criterion, settings
        self.accept_reads_candidate = ctx.criterion.checks_updates

    def __call__(self, ctx: CraftContext, idx: torch.Tensor, logits: torch.Tensor,
                 lookahead: torch.Tensor | None) -> StepResult:
        if lookahead is not None and self.accept_reads_candidate:
            lookahead = torch.cat([idx, lookahead])  # the image itself at v', for the accept rule
        look = _Lookahead(ctx, lookahead) if lookahead is not None else None
        r, ok = deepfool(ctx.classifier, ctx.perturbed(idx), logits=logits, lookahead=look,
                         target=self.criterion.target, **self.settings)
        if look is None or not bool(ok.all()):
            return StepResult(r, ok)
        z = look.logits
        if self.accept_reads_candidate:
            return StepResult(r, ok, look.candidate, z[1:], z[:1])
        return StepResult(r, ok, look.candidate, z)

    def accept(self, ctx: CraftContext, i: torch.Tensor, candidate: torch.Tensor, logits_at_v: torch.Tensor | None,
               logits_at_candidate: torch.Tensor | None) -> bool:
        if not self.criterion.checks_updates:
            return True
        at_v = ctx.logits(i) if logits_at_v is None else logits_at_v
        at_candidate = ctx.logits(i, candidate) if logits_at_candidate is None else logits_at_candidate
        return self.criterion.improves(at_v, at_candidate)


@register_method()
class DeepFool(Algorithm1):
    """Algorithm 1 with DeepFool as the inner step (module docstring)."""

    name = "deepfool"
    Options = DeepFoolMethodOptions
    supports_target = True

    def inner_step(self, ctx: CraftContext) -> InnerStep:
        return DeepFoolStep(ctx, self.options.deepfool())

    def describe(self, device: torch.device) -> dict[str, Any]:
        """DeepFool's settings, with the precision its gradients run in on ``device`` (bf16
        falls back to fp32 where it would be slower, with one warning)."""
        settings = self.options.deepfool()
        return {"deepfool": {**settings, "norm": norm_name(settings["norm"]),
                             "precision": effective_precision(settings["precision"], device)}}


@dataclass(frozen=True)
class BatchedOptions(DeepFoolMethodOptions):
    """As :class:`DeepFoolMethodOptions`, with minibatches of 32 by default."""

    batch_size: int = 32


@register_method()
class DeepFoolBatched(DeepFool):
    """``deepfool`` with one batched DeepFool call per minibatch of ``batch_size`` images."""

    name = "deepfool-batched"
    Options = BatchedOptions


@register_method()
class DeepFoolTargeted(DeepFool):
    """``deepfool`` for a targeted run only (a target class is required)."""

    name = "deepfool-targeted"
    requires_target = True
