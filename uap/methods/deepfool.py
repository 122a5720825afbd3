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

DeepFool's settings (norm, candidates, overshoot, max_iter, precision) are the run's
``deepfool_options``; every step attacks ``ctx.classifier`` (the batch-norm-folded copy).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from uap.deepfool import DeepFoolOptions, deepfool
from uap.methods.algorithm1 import Algorithm1, Algorithm1Options, InnerStep, StepResult, _Lookahead
from uap.methods.base import CraftContext, register_method
from uap.targeting import target_margin

__all__ = ["DeepFool", "DeepFoolBatched", "DeepFoolTargeted", "DeepFoolStep"]


class DeepFoolStep(InnerStep):
    """DeepFool on ``clip(x[idx] + v)``, untargeted or towards ``ctx.target``."""

    def __init__(self, ctx: CraftContext) -> None:
        self.target = ctx.target
        self.accept_reads_candidate = ctx.target is not None

    def needs_update(self, ctx: CraftContext, idx: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.target is None:
            return ~ctx.is_fooled(idx, logits)
        return target_margin(logits, self.target) <= 0

    def __call__(self, ctx: CraftContext, idx: torch.Tensor, logits: torch.Tensor,
                 lookahead: torch.Tensor | None) -> StepResult:
        if lookahead is not None and self.accept_reads_candidate:
            lookahead = torch.cat([idx, lookahead])  # the image itself at v', for the accept rule
        look = _Lookahead(ctx, lookahead) if lookahead is not None else None
        r, ok = deepfool(ctx.classifier, ctx.perturbed(idx), logits=logits, lookahead=look, target=self.target,
                         **ctx.deepfool)
        if look is None or not bool(ok.all()):
            return StepResult(r, ok)
        z = look.logits
        if self.accept_reads_candidate:
            return StepResult(r, ok, look.candidate, z[1:], z[:1])
        return StepResult(r, ok, look.candidate, z)

    def accept(self, ctx: CraftContext, i: torch.Tensor, candidate: torch.Tensor, logits_at_v: torch.Tensor | None,
               logits_at_candidate: torch.Tensor | None) -> bool:
        if self.target is None:
            return True
        at_v = ctx.logits(i) if logits_at_v is None else logits_at_v
        at_candidate = ctx.logits(i, candidate) if logits_at_candidate is None else logits_at_candidate
        return bool(target_margin(at_candidate, self.target)[0] > target_margin(at_v, self.target)[0])


@register_method()
class DeepFool(Algorithm1):
    """Algorithm 1 with DeepFool as the inner step (module docstring)."""

    name = "deepfool"
    supports_target = True
    deepfool_settings = frozenset(DeepFoolOptions.__dataclass_fields__)

    def inner_step(self, ctx: CraftContext) -> InnerStep:
        return DeepFoolStep(ctx)


@dataclass(frozen=True)
class BatchedOptions(Algorithm1Options):
    """As :class:`Algorithm1Options`, with minibatches of 32 by default."""

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
