"""Algorithm 1 of Moosavi-Dezfooli et al. (CVPR 2017) with a pluggable inner step.

The engine's ``"deepfool"`` method hard-wires DeepFool as the inner step
``Δv_i ← argmin_r ‖r‖₂ s.t. k̂(x_i + v + r) ≠ k̂(x_i)``. Targeted UAPs (targeted DeepFool)
and the Foolbox adapter (any Foolbox minimisation attack) run the *same* outer loop with a
different inner step and a different "does this image still need an update?" test, so the
loop lives here once::

    for x_i in X (the pass's visiting order):
        if todo(x_i + v):                       # e.g. k̂(x_i + v) = k̂(x_i)
            Δv_i, ok ← step(x_i + v)            # a minimal perturbation, batched
            if ok and accept(x_i, P(v + Δv_i)):  # e.g. "moves towards the target"
                v ← P_{p,ε}(v + Δv_i)

With ``batch_size=1`` this is Algorithm 1 exactly (one image at a time, every update seen by
the next image); the ``todo`` test is evaluated for a *chunk* of upcoming images in one
forward pass and re-evaluated only after ``v`` changes (same trick as the engine's
``"deepfool"`` method, so the sequence of updates is identical to a plain loop). With
``batch_size > 1`` the inner step runs on every image of a minibatch that needs an update,
in one call, and the successful steps are folded in one after another (the engine's
``"deepfool-batched"`` semantics).
"""
from __future__ import annotations

from typing import Callable

import torch

from uap.universal import CraftContext

__all__ = ["algorithm1_pass", "InnerStep", "TodoFn", "AcceptFn"]

#: ``step(x_perturbed, idx) -> (r, ok)``: minimal perturbations for the images ``clip(x[idx] + v)``.
InnerStep = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]
#: ``todo(idx) -> bool mask``: which images still need an update at the current ``ctx.v``.
TodoFn = Callable[[torch.Tensor], torch.Tensor]
#: ``accept(idx, v_candidate) -> bool``: extra accept rule for one image (``idx`` has one entry).
AcceptFn = Callable[[torch.Tensor, torch.Tensor], bool]


def algorithm1_pass(
    ctx: CraftContext,
    step: InnerStep,
    *,
    todo: TodoFn,
    accept: AcceptFn | None = None,
    batch_size: int = 1,
) -> None:
    """Run one pass of Algorithm 1 over ``ctx.order`` with ``step`` as the inner attack.

    Counts the work in ``ctx``: ``visited``, ``fooled_seen`` (visited images that needed no
    update), ``deepfool_calls`` (images given to ``step``) and ``updates``.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer ≥ 1, got {batch_size!r}")
    if batch_size == 1:
        _exact_pass(ctx, step, todo, accept)
    else:
        _minibatch_pass(ctx, step, todo, accept, batch_size)


def _try_update(ctx: CraftContext, i: torch.Tensor, dv: torch.Tensor, accept: AcceptFn | None) -> bool:
    candidate = ctx.project(ctx.v + dv)
    if accept is not None and not accept(i, candidate):
        return False
    ctx.v = candidate
    ctx.updates += 1
    return True


def _exact_pass(ctx: CraftContext, step: InnerStep, todo: TodoFn, accept: AcceptFn | None) -> None:
    order = ctx.order
    n = order.numel()
    chunk = int(ctx.options.get("chunk_size", 16))
    max_chunk = int(ctx.options.get("max_chunk_size", 512))
    if chunk < 1 or max_chunk < 1:
        raise ValueError("chunk_size and max_chunk_size must be ≥ 1")
    pos = 0
    while pos < n:
        idx = order[pos:pos + chunk]
        need = todo(idx)
        advanced = idx.numel()
        for j in torch.nonzero(need).flatten().tolist():
            i = idx[j:j + 1]
            r, ok = step(ctx.perturbed(i), i)
            ctx.deepfool_calls += 1
            if bool(ok[0]) and _try_update(ctx, i, r[0], accept):
                advanced = j + 1  # v changed: the rest of the chunk must be re-checked
                break
        ctx.visited += advanced
        ctx.fooled_seen += int((~need[:advanced]).sum())
        pos += advanced
        chunk = min(chunk * 2, max_chunk) if advanced == idx.numel() else max(4, 2 * advanced)
        ctx.progress()


def _minibatch_pass(ctx: CraftContext, step: InnerStep, todo: TodoFn, accept: AcceptFn | None,
                    batch_size: int) -> None:
    for idx in ctx.order.split(batch_size):
        need = todo(idx)
        sel = idx[need]
        if sel.numel():
            r, ok = step(ctx.perturbed(sel), sel)
            ctx.deepfool_calls += sel.numel()
            for j in torch.nonzero(ok).flatten().tolist():
                _try_update(ctx, sel[j:j + 1], r[j], accept)
        ctx.visited += idx.numel()
        ctx.fooled_seen += int((~need).sum())
        ctx.progress()
