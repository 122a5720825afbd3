"""Algorithm 1 of Moosavi-Dezfooli et al. (CVPR 2017), once, with a pluggable inner step.

Every method that builds ``v`` from per-image minimal perturbations runs this loop: DeepFool
(untargeted and targeted, one image at a time or a minibatch at a time) and any Foolbox
minimisation attack. They differ only in their :class:`InnerStep`::

    for x_i in X (the pass's visiting order):
        if step.needs_update(x_i + v):             # e.g. k̂(x_i + v) = k̂(x_i)
            Δv_i, ok ← step(x_i + v)               # a minimal perturbation
            if ok and step.accept(x_i, P(v + Δv_i)):
                v ← P_{p,ε}(v + Δv_i)

With ``batch_size=1`` this is Algorithm 1 exactly: one image at a time, every update seen by
the next image, in the same visiting order as a plain loop. It is fast because the "needs an
update?" test runs for a *chunk* of upcoming images in one forward pass, and is redone only
after ``v`` changes. The chunk doubles (up to ``max_chunk_size``) while no update happens and
shrinks to about twice the distance to the last update otherwise. A step that can classify
images inside its own last check (DeepFool: :class:`_Lookahead`) does the re-check after an
update for free: the next chunk's logits at ``v' = P(v + Δv_i)`` come back with ``Δv_i``.

With ``refine = R > 0`` (not the paper's), an image that the projected update ``P(v + Δv_i)``
leaves unfooled gets up to ``R`` more inner steps from ``x_i + P(v + Δv_i)``: under a tight
ℓ∞ budget the projection removes much of a DeepFool step, so the update alone often does not
do what it was computed for. With ``step_size = α < 1`` the update is ``P(v + α Δv_i)``.

With ``batch_size > 1`` the step runs on every image of a minibatch that needs an update, in
one call, and the successful steps are folded in one after another (``v ← P(v + Δv_j)``):
every Δv_j of a minibatch was computed at the ``v`` of the minibatch's start, and an image
that an earlier update of its minibatch already fooled still contributes its Δv.

Under ``torch.distributed``: the minibatch mode splits each minibatch's images that need an
update over the ranks, gathers their Δv in minibatch order and folds them in on every rank, so
every rank holds the one-process ``v``. Algorithm 1 itself (``batch_size=1``) is sequential
by definition: rank 0 runs the pass and broadcasts ``v`` (and the pass's counts) to the others.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from uap.distributed import broadcast, gather_rows, is_distributed, is_main, shard, world
from uap.methods.base import CraftContext, Method
from uap.options import Options, require

__all__ = ["Algorithm1", "Algorithm1Options", "InnerStep", "StepResult", "algorithm1_pass", "INNER_CALLS"]

#: The counter of inner-step calls (images given to the step), named after DeepFool, the
#: paper's inner step; every pass record holds it.
INNER_CALLS = "deepfool_calls"


@dataclass(frozen=True)
class Algorithm1Options(Options):
    """``batch_size``: 1 = Algorithm 1 exactly, more = minibatch inner steps;
    ``chunk_size``/``max_chunk_size``: images checked per forward pass (exact mode; they do
    not change the result); ``refine``: up to this many more inner steps for an image that the
    projected update ``P(v + Δv_i)`` leaves unfooled, each from ``x_i + P(v + Δv_i)`` (0, the
    paper: one step, whatever the projection does to it); ``step_size``: ``α`` in
    ``v ← P(v + α Δv_i)`` (1, the paper; smaller steps average the images' directions instead
    of letting the latest update overwrite ``v``)."""

    batch_size: int = 1
    chunk_size: int = 16
    max_chunk_size: int = 512
    refine: int = 0
    step_size: float = 1.0

    def check(self) -> None:
        require(self.batch_size >= 1, f"batch_size must be an integer ≥ 1, got {self.batch_size!r}")
        require(self.refine >= 0, f"refine must be an integer ≥ 0, got {self.refine!r}")
        require(0 < self.step_size <= 1, f"step_size must be in (0, 1], got {self.step_size!r}")
        require(self.chunk_size >= 1 and self.max_chunk_size >= 1, "chunk_size and max_chunk_size must be ≥ 1")


@dataclass
class StepResult:
    """Minimal perturbations ``r`` (B×C×H×W) for the images of one step and ``ok`` (B,): whether
    each succeeded. A one-image step with a lookahead also returns ``v' = P(v + r[0])`` and
    the logits of the lookahead images at ``v'`` (``at_candidate``: the logits of the image
    itself at ``v'``, when the accept rule asked for them)."""

    r: torch.Tensor
    ok: torch.Tensor
    candidate: torch.Tensor | None = None
    lookahead_logits: torch.Tensor | None = None
    at_candidate: torch.Tensor | None = None


class InnerStep:
    """The per-image part of Algorithm 1 (see the module docstring)."""

    #: Whether the accept rule reads the image's logits at the candidate ``v'`` (then a
    #: lookahead classifies the image itself at ``v'`` too).
    accept_reads_candidate: ClassVar[bool] = False

    def needs_update(self, ctx: CraftContext, idx: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Which of the images ``idx`` need an update, from the classifier's ``logits`` at the
        current ``v`` (the run's criterion decides)."""
        return ctx.criterion.needs_update(logits, ctx.clean[idx])

    def __call__(self, ctx: CraftContext, idx: torch.Tensor, logits: torch.Tensor,
                 lookahead: torch.Tensor | None) -> StepResult:
        """Minimal perturbations for ``clip(x[idx] + v)`` (``logits``: the classifier's there);
        ``lookahead`` (one-image steps only) are images to classify at ``v' = P(v + r)``."""
        raise NotImplementedError

    def accept(self, ctx: CraftContext, i: torch.Tensor, candidate: torch.Tensor, logits_at_v: torch.Tensor | None,
               logits_at_candidate: torch.Tensor | None) -> bool:
        """Extra accept rule for one image ``i`` and the candidate ``v' = P(v + Δv_i)``."""
        return True


class Algorithm1(Method):
    """Base of the Algorithm-1 methods: ``run_pass`` is :func:`algorithm1_pass` with
    :meth:`inner_step`; ``Options`` derive from :class:`Algorithm1Options`."""

    Options = Algorithm1Options
    counters = (INNER_CALLS,)

    def inner_step(self, ctx: CraftContext) -> InnerStep:
        raise NotImplementedError

    def run_pass(self, ctx: CraftContext) -> None:
        algorithm1_pass(ctx, self.inner_step(ctx), self.options)


def algorithm1_pass(ctx: CraftContext, step: InnerStep, options: Algorithm1Options) -> None:
    """One pass of Algorithm 1 over ``ctx.order`` with ``step`` as the inner attack.

    Counts the work in ``ctx``: ``visited``, ``fooled_seen`` (visited images that needed no
    update), the counter :data:`INNER_CALLS` (images given to ``step``) and ``updates``.
    """
    if options.batch_size > 1:
        _minibatch_pass(ctx, step, options.batch_size, options.refine)
    elif not is_distributed():
        _exact_pass(ctx, step, options.chunk_size, options.max_chunk_size, options.refine)
    else:  # Algorithm 1 is sequential: rank 0 runs the pass, every rank gets its v and counts
        if is_main():
            _exact_pass(ctx, step, options.chunk_size, options.max_chunk_size, options.refine)
        ctx.v = broadcast(ctx.v)
        names = list(ctx.counters)
        counts = [int(c) for c in broadcast(torch.tensor([ctx.visited, ctx.fooled_seen, ctx.updates,
                                                          *ctx.counters.values()]))]
        ctx.visited, ctx.fooled_seen, ctx.updates = counts[:3]
        ctx.counters.update(zip(names, counts[3:]))


def _chunk_after_update(advanced: int) -> int:
    """Images to check after an update ``advanced`` images into a chunk: about twice the
    distance between the last two updates, at least 4 (most of them are usually unfooled)."""
    return max(4, 2 * advanced)


def _step(ctx: CraftContext, r: torch.Tensor) -> torch.Tensor:
    """The candidate ``v' = P(v + α r)`` of an inner step's ``r`` (``α``: the method's ``step_size``)."""
    alpha = getattr(ctx.options, "step_size", 1.0)
    return ctx.project(ctx.v + r if alpha == 1.0 else ctx.v + alpha * r)


def _refined(ctx: CraftContext, step: InnerStep, i: torch.Tensor, candidate: torch.Tensor,
             rounds: int) -> tuple[torch.Tensor, bool]:
    """``candidate`` after up to ``rounds`` more inner steps on image ``i`` from the projected
    point, while the image is not fooled there: ``(v', changed)``."""
    changed = False
    for _ in range(rounds):
        z = ctx.logits(i, candidate)
        if not bool(step.needs_update(_At(ctx, candidate), i, z)[0]):
            break
        res = step(_At(ctx, candidate), i, z, None)
        ctx.count(INNER_CALLS)
        if not bool(res.ok[0]):
            break
        candidate, changed = ctx.project(candidate + res.r[0]), True
    return candidate, changed


class _At:
    """``ctx`` seen at another ``v`` (for an inner step from a projected point)."""

    def __init__(self, ctx: CraftContext, v: torch.Tensor) -> None:
        self._ctx, self.v = ctx, v

    def __getattr__(self, name: str):
        return getattr(self._ctx, name)

    def perturbed(self, idx: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        return self._ctx.perturbed(idx, self.v if v is None else v)

    def logits(self, idx: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        return self._ctx.logits(idx, self.v if v is None else v)

    def is_fooled(self, idx: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        return self._ctx.is_fooled(idx, self.logits(idx) if logits is None else logits)


def _exact_pass(ctx: CraftContext, step: InnerStep, chunk: int, max_chunk: int, refine: int = 0) -> None:
    order = ctx.order
    n = order.numel()
    pos = 0
    carried = None  # logits of the next chunk at the current v, from the step's lookahead
    while pos < n:
        idx = order[pos:pos + chunk]
        z = ctx.logits(idx) if carried is None else carried  # valid for the whole chunk until v changes
        carried = None
        need = step.needs_update(ctx, idx, z)
        advanced, next_chunk = idx.numel(), min(chunk * 2, max_chunk)  # no update: the chunk grows
        for j in torch.nonzero(need).flatten().tolist():
            i = idx[j:j + 1]
            after = order[pos + j + 1:pos + j + 1 + _chunk_after_update(j + 1)]
            res = step(ctx, i, z[j:j + 1], after)
            ctx.count(INNER_CALLS)
            if not bool(res.ok[0]):
                continue
            candidate = res.candidate if res.candidate is not None else _step(ctx, res.r[0])
            if step.accept(ctx, i, candidate, z[j:j + 1], res.at_candidate):
                candidate, changed = _refined(ctx, step, i, candidate, refine)
                ctx.v = candidate
                ctx.updates += 1
                advanced = j + 1  # v changed: the rest of the chunk must be re-checked …
                next_chunk, carried = after.numel(), res.lookahead_logits  # … unless the step already did
                carried = None if changed else carried  # (at the first candidate, not at the refined one)
                break
        ctx.visited += advanced
        ctx.fooled_seen += int((~need[:advanced]).sum())
        pos += advanced
        chunk = max(next_chunk, 1)
        ctx.progress()


def _minibatch_pass(ctx: CraftContext, step: InnerStep, batch_size: int, refine: int = 0) -> None:
    for idx in ctx.order.split(batch_size):
        z = ctx.logits(idx)
        need = step.needs_update(ctx, idx, z)
        sel = idx[need]
        if sel.numel():
            res = _spread(ctx, step, sel, z[need])
            ctx.count(INNER_CALLS, sel.numel())
            for j in torch.nonzero(res.ok).flatten().tolist():
                candidate = _step(ctx, res.r[j])
                if step.accept(ctx, sel[j:j + 1], candidate, None, None):
                    ctx.v = _refined(ctx, step, sel[j:j + 1], candidate, refine)[0]
                    ctx.updates += 1
        ctx.visited += idx.numel()
        ctx.fooled_seen += int((~need).sum())
        ctx.progress()


def _spread(ctx: CraftContext, step: InnerStep, sel: torch.Tensor, logits: torch.Tensor) -> StepResult:
    """``step`` on the images ``sel``; under ``torch.distributed`` each rank steps on its share
    and the results are gathered in order, so every rank folds in the same updates."""
    if not is_distributed() or sel.numel() < world()[1]:
        return step(ctx, sel, logits, None)
    part = shard(sel.numel())
    res = step(ctx, sel[part], logits[part], None)
    return StepResult(gather_rows(res.r, sel.numel()), gather_rows(res.ok.to(torch.uint8), sel.numel()).bool())


class _Lookahead:
    """Images a one-image DeepFool call classifies at ``v' = P(v + r)`` inside its own checks.

    Algorithm 1 is sequential: once DeepFool returns ``r`` for ``x_i`` and ``v`` becomes
    ``v'``, the next images must be checked at ``v'`` before the next DeepFool call. That check
    and DeepFool's own last check (is ``clip(x_i + r)`` fooled?) would be two small forward
    passes, dominated by per-pass overhead on a CPU; with the lookahead they are one.
    ``candidate`` is ``v'`` for the ``r`` of DeepFool's latest check, so when DeepFool stops it
    is ``P(v + r)`` for the very ``r`` returned, the ``v'`` the logits saw.
    """

    def __init__(self, ctx: CraftContext, images: torch.Tensor) -> None:
        self.ctx, self.idx = ctx, images
        self.candidate: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def images(self, r: torch.Tensor) -> torch.Tensor:
        self.candidate = _step(self.ctx, r[0])
        return self.ctx.perturbed(self.idx, self.candidate)
