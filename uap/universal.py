"""Universal perturbations: Algorithm 1 of Moosavi-Dezfooli et al. (CVPR 2017) and variants.

Algorithm 1, as in the paper (and DEVELOPERS.md)::

    v ← 0
    while Err(X_v) ≤ 1 − δ (and passes < max_passes):
        for x_i in X (shuffled):
            if k̂(x_i + v) = k̂(x_i):
                Δv_i ← argmin_r ‖r‖₂ s.t. k̂(x_i + v + r) ≠ k̂(x_i)      (DeepFool)
                v ← P_{p,ε}(v + Δv_i)                                   (if DeepFool converged)

:func:`craft` is the shared driver: validation, the visiting order, the stop rule, the
per-pass history record, the callback and resuming. What happens *inside* one pass is a
**method**, looked up by name in a small registry (:func:`register_method`), so later
methods (``sgd``, ``feature``, targeted, ``foolbox:<Attack>`` in ``uap/methods/``) plug in
without touching the driver. Two methods live here:

- ``"deepfool"`` — Algorithm 1 exactly: same visiting order for a seed, same accept rule
  (update only when k̂(x_i+v) = k̂(x_i) and DeepFool converged), one image at a time. It is
  fast because the "is x_i still unfooled?" test is done for a *chunk* of upcoming images
  in one forward pass, and re-done only after ``v`` changes; that re-check rides along in
  DeepFool's own last "is x_i + r fooled?" pass (:class:`uap.deepfool.Lookahead`), so it costs
  no pass of its own, and the chunk's logits also serve as DeepFool's step 0. The chunk size
  adapts: it doubles while no update happens (late passes, most images already fooled) and
  shrinks to about twice the distance to the last update otherwise.
- ``"deepfool-batched"`` — for each minibatch of the visiting order, DeepFool runs on every
  image not yet fooled *at the current v*, in one batched call, and the converged updates
  are folded in one after another with a projection after each
  (``v ← P(v + Δv_j)``). Differences from Algorithm 1: every Δv_j of a minibatch was
  computed at the ``v`` of the start of the minibatch (not after the earlier updates of
  the same minibatch), and an image that an earlier update of its minibatch already fooled
  still contributes its Δv. With ``batch_size=1`` it is Algorithm 1.

Both run the model through :attr:`CraftContext.classifier`: a copy with its batch norm folded
into the convolutions (:mod:`uap.fold`; the same function up to float rounding, checked
before use), since DeepFool's ten backward passes per step each pay for every batch-norm
layer. Fooling rates (the stop rule and the history) are measured on the model as given.

Visiting order: pass ``k`` (1-based) visits ``visiting_order(N, seed, k)``, a permutation
drawn from a generator seeded with ``(seed, k)`` only — so a resumed run and a reference
loop see the same order.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from uap.deepfool import Lookahead, deepfool
from uap.fold import count_batchnorm, fold_batchnorm
from uap.forward import DEFAULT_BATCH_SIZE, BatchLayout, check_images, check_perturbation, eval_mode, model_device
from uap.metrics import accuracy, clean_predictions, fooling_rate
from uap.perturbation import Perturbation
from uap.projection import check_eps, check_norm, lp_norm, norm_name, project_lp

__all__ = [
    "craft",
    "CraftContext",
    "register_method",
    "get_method",
    "available_methods",
    "visiting_order",
]

MethodFn = Callable[["CraftContext"], None]
Callback = Callable[[dict], Any]

_METHODS: dict[str, MethodFn] = {}
_PREFIX_METHODS: dict[str, MethodFn] = {}


# --------------------------------------------------------------------------- registry

def register_method(name: str, *, prefix: bool = False) -> Callable[[MethodFn], MethodFn]:
    """Register ``fn(ctx: CraftContext) -> None`` as the crafting method ``name``.

    The function runs ONE pass over ``ctx.order``: it visits images, updates ``ctx.v``
    (keeping it in the ball, e.g. with ``ctx.project``) and counts its work in
    ``ctx.visited`` / ``ctx.deepfool_calls`` / ``ctx.updates``; it calls ``ctx.progress()``
    now and then for live display. With ``prefix=True`` the method answers every name
    ``"name:ARG"`` (``ctx.method`` holds the full name), e.g. ``"foolbox:L2DeepFoolAttack"``.
    """

    def decorate(fn: MethodFn) -> MethodFn:
        (_PREFIX_METHODS if prefix else _METHODS)[name] = fn
        return fn

    return decorate


def get_method(name: str) -> MethodFn:
    """The pass function registered for ``name`` (``ValueError`` listing the known ones)."""
    for attempt in range(2):
        if name in _METHODS:
            return _METHODS[name]
        head, sep, _ = name.partition(":")
        if sep and head in _PREFIX_METHODS:
            return _PREFIX_METHODS[head]
        if attempt == 0:
            _import_method_plugins()
    raise ValueError(f"unknown method {name!r}: choose one of {', '.join(available_methods())}")


def _import_method_plugins() -> None:
    """Import ``uap.methods`` (its modules register more methods), if it is there."""
    try:
        import uap.methods  # noqa: F401
    except ImportError:
        pass


def available_methods() -> list[str]:
    """Registered method names (prefix methods shown as ``name:…``)."""
    _import_method_plugins()
    return sorted(_METHODS) + [f"{p}:…" for p in sorted(_PREFIX_METHODS)]


def visiting_order(n: int, seed: int, pass_index: int) -> torch.Tensor:
    """The permutation of ``range(n)`` visited in pass ``pass_index`` (1-based) for ``seed``."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(pass_index))
    return torch.randperm(n, generator=g)


# --------------------------------------------------------------------------- context

@dataclass
class CraftContext:
    """What a method sees during one pass, and the counters it fills in."""

    model: nn.Module
    x: torch.Tensor  # crafting images, on the model's device
    clean: torch.Tensor  # clean predictions k̂(x_i), on the model's device
    v: torch.Tensor  # the current perturbation (C×H×W, on the model's device)
    eps: float
    p: float
    order: torch.Tensor  # indices visited in this pass
    pass_index: int
    method: str
    generator: torch.Generator  # for methods that need more randomness, seeded per pass
    deepfool_options: dict[str, Any]
    options: dict[str, Any]
    callback: Callback | None = None
    target: int | None = None  # a target class for targeted methods (None: untargeted)
    visited: int = 0
    fooled_seen: int = 0  # visited images already fooled when visited (live estimate)
    deepfool_calls: int = 0
    updates: int = 0
    shared: dict[str, Any] = field(default_factory=dict, repr=False)  # kept across the passes of one craft call
    _last_emit: float = field(default=0.0, repr=False)
    _layout: BatchLayout | None = field(default=None, repr=False)

    @property
    def classifier(self) -> nn.Module:
        """The model as the DeepFool passes and :meth:`logits` run it: a copy with its batch norm
        folded into the layers before it (:func:`uap.fold.fold_batchnorm`; the same function up
        to float rounding, and up to 1.15× faster to attack), unless ``options["fold_batchnorm"]`` is
        False. Made once per :func:`craft` call, on first use; methods that call ``model``
        directly attack the model as it is."""
        if "classifier" not in self.shared:
            fold = self.options.get("fold_batchnorm", True)
            if not isinstance(fold, bool):
                raise ValueError(f"fold_batchnorm must be true or false, got {fold!r}")
            self.shared["classifier"] = fold_batchnorm(self.model, self.x[:8]) if fold else self.model
        return self.shared["classifier"]

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """``P_{p,ε}(v)``."""
        return project_lp(v, self.eps, self.p)

    def perturbed(self, idx: torch.Tensor) -> torch.Tensor:
        """``clip(x[idx] + v, 0, 1)``."""
        return (self.x[idx] + self.v).clamp_(0.0, 1.0)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """The model's logits at ``clip(x[idx] + v, 0, 1)``, in one gradient-free forward pass."""
        if self._layout is None:
            self._layout = BatchLayout(self.x.device)
        return self._layout.logits(self.classifier, self.perturbed(idx))[1]

    def is_fooled(self, idx: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """``k̂(x_i + v) ≠ k̂(x_i)`` for each index (from ``logits`` at ``x[idx] + v`` if given)."""
        z = self.logits(idx) if logits is None else logits
        return z.argmax(dim=1) != self.clean[idx]

    def progress(self, force: bool = False) -> None:
        """Report live progress to the callback (at most ~10 times a second)."""
        now = time.perf_counter()
        if self.callback is None or (not force and now - self._last_emit < 0.1):
            return
        self._last_emit = now
        self.callback({
            "event": "progress", "pass": self.pass_index, "visited": self.visited,
            "total": int(self.order.numel()), "fooled_seen": self.fooled_seen,
            "deepfool_calls": self.deepfool_calls, "updates": self.updates,
        })


# --------------------------------------------------------------------------- methods

@register_method("deepfool")
def _pass_algorithm1(ctx: CraftContext) -> None:
    """One pass of Algorithm 1, with chunked "still unfooled?" checks (see module docstring)."""
    order = ctx.order
    n = order.numel()
    chunk = int(ctx.options.get("chunk_size", 16))
    max_chunk = int(ctx.options.get("max_chunk_size", 512))
    pos = 0
    carried = None  # logits of the next chunk at the current v, computed by DeepFool's lookahead
    while pos < n:
        idx = order[pos:pos + chunk]
        z = ctx.logits(idx) if carried is None else carried  # valid for the whole chunk until v changes
        carried = None
        fooled = ctx.is_fooled(idx, z)
        advanced, next_chunk = idx.numel(), min(chunk * 2, max_chunk)  # no update: the chunk grows
        for j in torch.nonzero(~fooled).flatten().tolist():
            i = idx[j:j + 1]
            # If this update is accepted, the next chunk is checked at v' = P(v + r): let DeepFool
            # classify it in the pass where it checks x_i + r (the same r, so the same v').
            after = order[pos + j + 1:pos + j + 1 + _chunk_after_update(j + 1)]
            moved: dict[str, torch.Tensor] = {}  # v' = P(v + r) for the r of DeepFool's latest check

            def next_images(r: torch.Tensor, after: torch.Tensor = after, moved: dict = moved) -> torch.Tensor:
                moved["v"] = ctx.project(ctx.v + r[0])
                return (ctx.x[after] + moved["v"]).clamp_(0.0, 1.0)

            look = Lookahead(next_images)
            r, ok = deepfool(ctx.classifier, ctx.perturbed(i), logits=z[j:j + 1], lookahead=look, **ctx.deepfool_options)
            ctx.deepfool_calls += 1
            if bool(ok[0]):  # accept rule: DeepFool converged (which takes a check after step 0)
                ctx.v = moved["v"]  # P(v + r) for the very r returned: the v' the carried logits saw
                ctx.updates += 1
                advanced = j + 1  # v changed: the rest of the chunk must be re-checked
                next_chunk, carried = after.numel(), look.logits  # … and DeepFool already did: `after`
                break
        ctx.visited += advanced
        ctx.fooled_seen += int(fooled[:advanced].sum())
        pos += advanced
        chunk = max(next_chunk, 1)
        ctx.progress()


def _chunk_after_update(advanced: int) -> int:
    """Images to check after an update ``advanced`` images into a chunk: about twice the
    distance between the last two updates, at least 4 (most of them are usually unfooled)."""
    return max(4, 2 * advanced)


@register_method("deepfool-batched")
def _pass_batched(ctx: CraftContext) -> None:
    """DeepFool on every unfooled image of a minibatch at once; updates folded in order."""
    batch_size = int(ctx.options.get("batch_size", 32))
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    for idx in ctx.order.split(batch_size):
        z = ctx.logits(idx)
        fooled = ctx.is_fooled(idx, z)
        todo = idx[~fooled]
        if todo.numel():
            r, ok = deepfool(ctx.classifier, ctx.perturbed(todo), logits=z[~fooled], **ctx.deepfool_options)
            ctx.deepfool_calls += todo.numel()
            for dv in r[ok]:
                ctx.v = ctx.project(ctx.v + dv)
                ctx.updates += 1
        ctx.visited += idx.numel()
        ctx.fooled_seen += int(fooled.sum())
        ctx.progress()


# --------------------------------------------------------------------------- driver

_DEEPFOOL_DEFAULTS = {"norm": 2, "candidates": 10, "overshoot": 0.02, "max_iter": 50, "precision": "fp32"}


def craft(
    model: nn.Module,
    x: torch.Tensor,
    *,
    eps: float,
    norm: float | int | str = math.inf,
    delta: float = 0.2,
    max_passes: int = 10,
    method: str = "deepfool",
    seed: int = 0,
    heldout: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    callback: Callback | None = None,
    deepfool_options: dict[str, Any] | None = None,
    method_options: dict[str, Any] | None = None,
    resume: Perturbation | None = None,
    model_id: str | None = None,
    data: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    target: int | None = None,
    keep_best: bool = False,
) -> Perturbation:
    """Craft a universal perturbation ``v`` with ``‖v‖_p ≤ eps`` that fools ``model`` on ``x``.

    Args:
        model: classifier on [0, 1] images (N×C×H×W → N×K logits); used in eval mode.
        x: the crafting set X (images in [0, 1]).
        eps: radius ε of the ℓp ball.
        norm: p ∈ {1, 2, inf} of the ball.
        delta: stop once the fooling rate on X exceeds ``1 − delta`` (0 < δ < 1).
        max_passes: at most this many passes over X.
        method: a registered method (``"deepfool"``, ``"deepfool-batched"``, …).
        seed: fixes the visiting order (see :func:`visiting_order`).
        heldout: images (or ``(images, labels)``) whose fooling rate (and accuracy under v)
            is recorded after every pass; they never influence ``v``.
        callback: called with ``{"event": "progress", …}`` during a pass and with
            ``{"event": "pass", **record, "v": v}`` after each; returning ``True`` from the
            latter stops crafting after that pass.
        deepfool_options: passed to :func:`uap.deepfool` (defaults: ℓ2 geometry as in
            Algorithm 1, 10 candidates, overshoot 0.02, 50 steps).
        method_options: method knobs (``batch_size`` for ``deepfool-batched``,
            ``chunk_size`` for ``deepfool``).
        resume: a :class:`Perturbation` from an earlier, interrupted run with the same
            settings; crafting continues from its ``v`` and history.
        model_id, data: descriptions stored in the result's metadata.
        batch_size: images per forward pass when measuring fooling rates.
        target: a class index handed to targeted methods as ``ctx.target``; ``"deepfool"``
            then runs as ``"deepfool-targeted"`` (``uap.methods.targeted``), the stop rule uses
            the targeted success rate and each record also holds ``targeted_success_rate``
            and ``heldout_targeted_success_rate``; stored in the metadata.
        keep_best: return the ``v`` of the pass with the highest rate on X (the crafting set;
            held-out images are never used to choose) instead of the last pass's. Algorithm 1
            is not monotone: a pass can lower the fooling rate. The chosen pass is stored as
            ``extra["best_pass"]`` (0: no pass beat the starting ``v``); the history keeps
            every pass. Candidates are the starting ``v`` and the passes of this call.

    Returns:
        A :class:`Perturbation` whose ``history`` has one record per pass with
        ``fooling_rate``, ``heldout_fooling_rate`` (None without ``heldout``), ``norm_2``,
        ``norm_inf``, ``visited``, ``deepfool_calls``, ``updates`` and ``seconds``.
    """
    eps = check_eps(eps)
    p = check_norm(norm)
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if not isinstance(max_passes, int) or isinstance(max_passes, bool) or max_passes < 1:
        raise ValueError(f"max_passes must be an integer ≥ 1, got {max_passes!r}")
    check_images(x, "x (the crafting set)")
    if target is not None and method == "deepfool":
        method = "deepfool-targeted"  # Algorithm 1 with DeepFool restricted to the target class
    if target is not None and method == "deepfool-batched":
        raise ValueError("deepfool-batched is untargeted; use method='deepfool' (or 'sgd') with a target")
    pass_fn = get_method(method)
    df_options = {**_DEEPFOOL_DEFAULTS, **(deepfool_options or {})}
    unknown = set(df_options) - set(_DEEPFOOL_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown DeepFool option(s) {sorted(unknown)}; known: {sorted(_DEEPFOOL_DEFAULTS)}")
    hx, hy = _split_heldout(heldout, x)
    if target is not None and (isinstance(target, bool) or not isinstance(target, int) or target < 0):
        raise ValueError(f"target must be a class index ≥ 0, got {target!r}")

    device = model_device(model)
    history: list[dict] = []
    v = torch.zeros(x.shape[1:], dtype=x.dtype, device=device)
    if resume is not None:
        v = check_perturbation(resume.v, x).to(device=device, dtype=x.dtype)
        history = [dict(r) for r in resume.history]
        if lp_norm(v, p).item() > eps * (1 + 1e-5):
            raise ValueError(f"the perturbation to resume has ‖v‖_{norm_name(p)} > eps={eps:g}; settings differ?")

    started = time.perf_counter()
    with eval_mode(model):
        clean = clean_predictions(model, x, batch_size=batch_size)  # also checks the N×C output
        xd, cleand = x.to(device), clean.to(device)
        if target is not None:
            from uap.methods.targeted import check_target, targeted_success_rate

            with torch.no_grad():
                target = check_target(target, model(xd[:1]).shape[1])

        def stop_rate(v: torch.Tensor) -> float:
            """Err(X_v) — or, for a targeted run, the targeted success rate on X."""
            if target is None:
                return fooling_rate(model, x, v, clean=clean, batch_size=batch_size)
            return targeted_success_rate(model, x, v, target, batch_size=batch_size)

        key = "fooling_rate" if target is None else "targeted_success_rate"
        measured = resume.record if resume is not None else {}  # the record of the v we start from
        if key in measured:
            rate = measured[key]
        elif resume is None and target is None and bool((x.min() >= 0) & (x.max() <= 1)):
            rate = 0.0  # v = 0 leaves every image in [0, 1] as it is: no prediction changes
        else:
            rate = stop_rate(v)
        best_pass = int(resume.extra.get("best_pass", len(history))) if resume is not None else 0
        best_rate, best_v = rate, v
        shared: dict[str, Any] = {}  # what the passes share, e.g. the batch-norm-folded classifier
        while rate <= 1 - delta and len(history) < max_passes:
            k = len(history) + 1
            t0 = time.perf_counter()
            ctx = CraftContext(
                model=model, x=xd, clean=cleand, v=v, eps=eps, p=p,
                order=visiting_order(x.shape[0], seed, k).to(device), pass_index=k, method=method,
                generator=torch.Generator().manual_seed(int(seed) * 1_000_003 + k + 7919),
                deepfool_options=df_options, options=dict(method_options or {}), callback=callback,
                target=target, shared=shared,
            )
            pass_fn(ctx)
            ctx.progress(force=True)
            v = ctx.v.detach()
            fooled = fooling_rate(model, x, v, clean=clean, batch_size=batch_size)
            rate = fooled if target is None else stop_rate(v)  # untargeted: one evaluation serves both
            record = {
                "pass": k,
                "fooling_rate": fooled,
                "heldout_fooling_rate": None if hx is None else fooling_rate(model, hx, v, batch_size=batch_size),
                "heldout_accuracy": None if hy is None else accuracy(model, hx, hy, v, batch_size=batch_size),
                "norm_2": lp_norm(v, 2).item(),
                "norm_inf": lp_norm(v, math.inf).item(),
                "visited": ctx.visited,
                "deepfool_calls": ctx.deepfool_calls,
                "updates": ctx.updates,
                "seconds": time.perf_counter() - t0,
            }
            if target is not None:
                record["targeted_success_rate"] = rate
                record["heldout_targeted_success_rate"] = (
                    None if hx is None else targeted_success_rate(model, hx, v, target, batch_size=batch_size))
            history.append(record)
            if rate > best_rate:
                best_rate, best_pass, best_v = rate, k, v
            if callback is not None and callback({"event": "pass", **record, "v": v.detach().cpu()}) is True:
                break
    seconds = time.perf_counter() - started + (resume.seconds if resume is not None else 0.0)
    extra: dict[str, Any] = {
        "n_images": int(x.shape[0]),
        "n_heldout": None if hx is None else int(hx.shape[0]),
        "deepfool": {k: (norm_name(v_) if k == "norm" else v_) for k, v_ in df_options.items()},
        "method_options": dict(method_options or {}),
        "max_passes": max_passes,
        **({"batchnorm_folded": count_batchnorm(model) - count_batchnorm(shared["classifier"])}
           if "classifier" in shared else {}),  # BatchNorm layers the passes ran folded (uap.fold)
        **({"target": target} if target is not None else {}),
        **({"best_pass": best_pass} if keep_best else {}),
        "clean_heldout_accuracy": None if hy is None else accuracy(model, hx, hy, batch_size=batch_size),
    }
    if keep_best:
        v = best_v
    return Perturbation(
        v=v.detach().cpu(), model=model_id or type(model).__name__, data=data or f"{x.shape[0]} images",
        eps=eps, norm=norm_name(p), delta=float(delta), method=method, seed=int(seed),
        history=history, seconds=seconds, extra=extra,
    )


def _split_heldout(heldout, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if heldout is None:
        return None, None
    if isinstance(heldout, (tuple, list)):
        if len(heldout) != 2:
            raise ValueError("heldout must be images or an (images, labels) pair")
        hx, hy = heldout
    else:
        hx, hy = heldout, None
    check_images(hx, "heldout")
    if tuple(hx.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(f"held-out images are {tuple(hx.shape[1:])}, crafting images {tuple(x.shape[1:])}")
    if hy is not None and (not torch.is_tensor(hy) or hy.shape != (hx.shape[0],)):
        raise ValueError(f"held-out labels must have shape ({hx.shape[0]},)")
    return hx, hy
