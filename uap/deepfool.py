"""Batched multi-class DeepFool (Moosavi-Dezfooli, Fawzi & Frossard, CVPR 2016).

DeepFool linearises the classifier around the current point and steps to the nearest
linearised decision boundary among the top ``candidates`` classes, until the predicted label
changes. For the original class ``k₀`` and a candidate ``k``, with ``f_k = z_k − z_{k₀}``
(logit difference) and ``w_k = ∇_x f_k``:

- ℓ2 (Algorithm 2 of the paper): ``l̂ = argmin_k |f_k| / ‖w_k‖₂`` and
  ``r_i = |f_l̂| / ‖w_l̂‖₂² · w_l̂``;
- ℓ∞ (§3.3, p = ∞, dual norm q = 1): ``l̂ = argmin_k |f_k| / ‖w_k‖₁`` and
  ``r_i = |f_l̂| / ‖w_l̂‖₁ · sign(w_l̂)``.

The total ``r = (1 + overshoot) Σ r_i``; the label is checked at ``clip(x + r, 0, 1)``, so
the overshoot is what carries the point across the boundary (each step's distance is also
padded by ``_STEP_PAD`` so that points stuck at the [0, 1] box keep moving).

What differs from ART and Foolbox is the cost, not the maths:

- all images are processed as one batch, and rows that are already fooled drop out of the
  batch (they stop costing forward and backward passes);
- each step is a gradient-free pass that classifies every active row (and gives the logit
  differences ``f_k``), then a gradient pass over the rows still unfooled only, in which ONE
  forward pass serves all ``candidates − 1`` gradients: from ONE batched autograd call
  (``torch.autograd.grad(..., is_grads_batched=True)``, a vmap over the backward pass;
  ``gradients="batched"``) or from one backward per class over that graph
  (``gradients="loop"``, ``retain_graph``). Foolbox and ART redo the forward pass for every
  class. A third mode, ``gradients="replicated"``, copies each row once per candidate and
  gets every gradient from ONE forward and ONE backward over the copies (K× the forward
  arithmetic, one backward instead of K): on a CPU this wins for single images and small
  batches, where every pass costs mostly per-operator overhead. ``"auto"`` picks
  ``"batched"`` on CUDA; on the CPU, where vmap over convolution backward is slow, it picks
  ``"replicated"`` for steps whose unfooled rows hold ≤ ``REPLICATE_MAX_ELEMENTS`` input
  elements (16 CIFAR images) and ``"loop"`` above — at 224² even one image takes the loop
  (the crossovers are measured in BENCHMARKS.md). All modes give the same gradients (tested);
  models whose layers vmap cannot batch fall back to the loop.
- the clean prediction comes from the first step's classification pass, or from the
  caller's logits (``logits=``), e.g. those of a crafting pass's "still unfooled?" check.
- ``precision="bf16"`` computes only the gradients under bfloat16 autocast; ``f_k`` and
  every decision come from the fp32 classification pass.
- a one-image call can classify the caller's next images in its own checks (``lookahead``):
  Algorithm 1's re-check after an update then costs no pass.

**Targeted** (``target=t``): the same steps with one candidate, ``f = z_t − z_k`` for the
strongest rival ``k ≠ t`` at the current point, until ``t`` is the predicted class
(``z_t > max_{j≠t} z_j``); images already predicted as ``t`` get ``r = 0`` and success.
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import torch
from torch import nn

from uap.forward import BatchLayout, check_dtype, check_images, eval_mode, logits_of, model_device
from uap.options import Options, require
from uap.projection import check_norm
from uap.criteria import check_target, target_margin

__all__ = ["deepfool", "DeepFoolOptions", "GRADIENT_MODES", "PRECISIONS", "bf16_slow_reason", "effective_precision"]

#: How the ``candidates − 1`` gradients of a step are computed (see :func:`deepfool`).
GRADIENT_MODES = ("auto", "batched", "loop", "replicated")
#: The arithmetic of the candidates' gradients (see :func:`deepfool`).
Precision = Literal["fp32", "bf16"]
PRECISIONS = get_args(Precision)

_TINY = 1e-8  # guards divisions by a vanishing gradient norm, as in the reference code
# Added to each step's distance so that progress never stalls at the clip boundary of [0, 1]
# (a step whose components are clipped away moves the point less than the linear model
# predicts; without the pad many CIFAR-10 images never cross). DeepFool's reference code
# and Foolbox pad by 1e-4; 1e-5 gives the same success and keeps a step within 1e-4 relative
# of the exact minimal step for any boundary distance ≥ 0.1.
_STEP_PAD = 1e-5


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which bfloat16 still has native instructions.
_BF16_ISAS = ("BF16", "AMX", "AVX10", "ALL", "DEFAULT")


def bf16_slow_reason(device: torch.device | str) -> str | None:
    """Why bfloat16 gradients would be *slower* than float32 on ``device``, or None if they are not.

    On a CPU without native bfloat16 arithmetic (AVX512-BF16 or AMX) every bfloat16 operation
    is converted to and from float32 around float32 arithmetic (reported 7.8–12× slower than
    float32 on an AVX2-only EPYC). The CPU's flags come from PyTorch's own cpuinfo
    (``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported``), and a
    ``ONEDNN_MAX_CPU_ISA`` below them counts as their absence. On CUDA, a GPU without native
    bfloat16 (before Ampere) is slow the same way.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8:
            return None
        return "this GPU has no native bfloat16 arithmetic (needs compute capability 8.0+)"
    if device.type != "cpu":
        return None
    cpu = getattr(torch, "cpu", None)
    native = any(bool(getattr(cpu, name, lambda: False)()) for name in ("_is_avx512_bf16_supported",
                                                                        "_is_amx_tile_supported"))
    if not native:
        return f"this CPU has no native bfloat16 arithmetic (AVX512-BF16 or AMX; it has {torch.backends.cpu.get_cpu_capability()})"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap and not any(isa in cap for isa in _BF16_ISAS):
        return f"ONEDNN_MAX_CPU_ISA={cap} leaves oneDNN without the CPU's bfloat16 instructions"
    return None


def effective_precision(precision: str, device: torch.device | str) -> str:
    """The precision DeepFool's gradients run in on ``device``: ``precision``, except that
    ``"bf16"`` falls back to ``"fp32"`` where :func:`bf16_slow_reason` says it would be slower
    (one warning per process and reason: the result is then a float32 result, and says so)."""
    if precision != "bf16":
        return precision
    reason = bf16_slow_reason(device)
    if reason is None:
        return precision
    _warn_once(f"--precision bf16 falls back to fp32: {reason}, so bf16 would be several times slower")
    return "fp32"


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


@dataclass(frozen=True)
class DeepFoolOptions(Options):
    """The DeepFool settings a crafting run passes to every inner step (:func:`deepfool`'s
    keyword arguments of the same names; the defaults are the paper's)."""

    norm: float | int | str = 2
    candidates: int = 10
    overshoot: float = 0.02
    max_iter: int = 50
    precision: Precision = "fp32"

    def check(self) -> None:
        require(check_norm(self.norm) != 1.0, "deepfool supports norm 2 or inf (the ℓ1 variant is not implemented)")
        require(self.candidates >= 2, f"candidates must be an integer ≥ 2, got {self.candidates!r}")
        require(self.overshoot >= 0, f"overshoot must be ≥ 0, got {self.overshoot!r}")
        require(self.max_iter >= 0, f"max_iter must be an integer ≥ 0, got {self.max_iter!r}")


class Lookahead(Protocol):
    """What a one-image :func:`deepfool` call classifies alongside its own checks.

    Every check after step 0 also classifies ``images(r)`` for the current ``r`` (exactly the
    tensor :func:`deepfool` would return at that point) and stores their logits in
    ``logits``; when DeepFool stops, ``logits`` belong to the ``r`` it returned.
    """

    logits: torch.Tensor | None

    def images(self, r: torch.Tensor) -> torch.Tensor: ...


def deepfool(
    model: nn.Module,
    x: torch.Tensor,
    *,
    norm: float | int | str = 2,
    candidates: int = 10,
    overshoot: float = 0.02,
    max_iter: int = 50,
    gradients: str = "auto",
    logits: torch.Tensor | None = None,
    precision: str = "fp32",
    lookahead: Lookahead | None = None,
    target: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimal perturbations that change the model's prediction on each image of ``x``.

    Args:
        model: classifier taking images in [0, 1] (N×C×H×W) and returning logits N×K.
        x: images in [0, 1]; the label to move away from is the model's prediction on ``x``.
        norm: 2 or ``inf`` — the geometry of the step (ℓ∞ uses the ℓ1 dual norm and a sign step).
        candidates: how many top classes (the predicted one included) are considered
            (untargeted only: a targeted step has one candidate).
        overshoot: the accumulated step is multiplied by ``1 + overshoot`` (paper: 0.02).
        max_iter: maximum number of linearisation steps per image.
        gradients: ``"batched"`` (one vmapped backward), ``"loop"`` (one backward per
            candidate on a shared forward graph), ``"replicated"`` (one forward and one
            backward over a copy of each row per candidate) or ``"auto"`` (batched on CUDA;
            on the CPU replicated up to ``REPLICATE_MAX_ELEMENTS`` input elements, loop above).
        logits: the model's logits at ``x`` (N×K), when the caller already has them (e.g.
            from checking that ``x`` is still unfooled). Step 0 then classifies with them
            instead of a forward pass of its own.
        precision: ``"fp32"``, or ``"bf16"`` to compute the candidates' gradients ∇f_k under
            bfloat16 autocast (faster on CPUs with AVX512-BF16 and on recent GPUs). Only the
            *direction* of each step is approximate: the logit
            differences f_k and every "is it fooled yet?" decision stay fp32, so ``success``
            means the same thing in both precisions, and an imprecise step is corrected by
            the next one.
        lookahead: for a one-image call, an object with ``images(r)`` and ``logits``
            (:class:`Lookahead`) whose images are classified in the same forward passes as
            DeepFool's own "fooled yet?" checks.
        target: a class (or one per image) to reach instead of leaving the prediction.

    Returns:
        ``(r, success)``: ``r`` has ``x``'s shape and includes the overshoot (it is *not*
        clipped: ``clip(x + r, 0, 1)`` is the adversarial image); ``success[i]`` is True when
        the prediction at ``clip(x_i + r_i, 0, 1)`` differs from the prediction at ``x_i``
        (targeted: when it is the target).
    """
    check_dtype(model, check_images(x))
    DeepFoolOptions.parse(dict(norm=norm, candidates=candidates, overshoot=overshoot, max_iter=max_iter,
                               precision=precision), owner="deepfool")
    p = check_norm(norm)
    if gradients not in GRADIENT_MODES:
        raise ValueError(f"gradients must be one of {', '.join(map(repr, GRADIENT_MODES))}, got {gradients!r}")
    if lookahead is not None and x.shape[0] != 1:
        raise ValueError(f"a lookahead needs a one-image call, got {x.shape[0]} images")
    device = model_device(model)
    autocast = torch.bfloat16 if effective_precision(precision, device) == "bf16" else None

    x0 = x.detach().to(device)
    n = x0.shape[0]
    if logits is not None:
        if not torch.is_tensor(logits) or logits.dim() != 2 or logits.shape[0] != n or logits.shape[1] < 2:
            shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
            raise ValueError(f"logits must be the model's N×K output at x (N={n}, K ≥ 2), got {shape}")
        logits = logits.detach().to(device)
    total = torch.zeros_like(x0)  # Σ r_i, before overshoot
    success = torch.zeros(n, dtype=torch.bool, device=device)
    auto = gradients == "auto"
    with eval_mode(model):
        targets = None if target is None else _targets(model, x0, target, logits)
        classes = None
        active = torch.arange(n, device=device)
        vmap_state = {"ok": True}  # turns False for the call if vmap cannot batch one of the model's layers
        layout = BatchLayout(device, model)
        for step in range(max_iter + 1):
            xa = (x0[active] + (1.0 + overshoot) * total[active]).clamp(0.0, 1.0)
            if auto:  # decided per step: rows drop out, so late steps are small batches
                gradients = _auto_gradients(device, xa)
            if step == 0 and logits is not None:
                z = logits  # the caller's pass at x classifies step 0
            elif step > 0 and lookahead is not None:  # the caller's images ride along in this pass
                extra = lookahead.images(((1.0 + overshoot) * total).to(x.device))  # r as returned
                xa, z = layout.logits(model, torch.cat([xa, extra.to(device)]))
                xa, z, lookahead.logits = xa[:1], z[:1], z[1:]
            else:  # a gradient-free pass classifies; the rows still unfooled then get their gradients
                xa, z = layout.logits(model, xa)
            if targets is not None:
                fooled = target_margin(z, targets[active]) > 0
            else:
                if classes is None:  # step 0 is at x itself (x is in [0, 1]): its prediction is k̂(x)
                    k = min(candidates, z.shape[1])
                    classes = z.topk(k, dim=1).indices  # column 0 is the predicted class k̂(x)
                fooled = z.argmax(dim=1) != classes[active, 0]
            success[active[fooled]] = True
            keep = ~fooled
            if step == max_iter or not bool(keep.any()):
                break
            cls = classes[active][keep] if targets is None else _rival_and_target(z[keep], targets[active][keep])
            zc = z[keep].gather(1, cls)
            diffs = zc[:, 1:] - zc[:, :1]  # f_k = z_k − z_k̂ (fp32), negative while not fooled
            state = vmap_state if gradients == "batched" else {"ok": False}  # "loop"/"replicated": no vmap
            grads = _chunked_linearise(model, xa[keep].detach(), cls, layout, gradients, state, autocast)
            flat = grads.flatten(2)
            dual = flat.norm(dim=2) if p == 2.0 else flat.abs().sum(dim=2)  # ‖w_k‖₂ or ‖w_k‖₁
            dist = diffs.abs() / (dual + _TINY)
            best = dist.argmin(dim=1)
            rows = torch.arange(best.shape[0], device=device)
            d = (dist[rows, best] + _STEP_PAD).view(-1, *([1] * (x0.dim() - 1)))
            w = grads[rows, best]
            if p == 2.0:
                r_i = d * w / (dual[rows, best].view_as(d) + _TINY)
            else:
                r_i = d * w.sign()
            active = active[keep]
            total[active] += r_i
    return ((1.0 + overshoot) * total).to(x.device), success.to(x.device)


def _targets(model: nn.Module, x0: torch.Tensor, target: int | torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
    """The target class of every row, checked against the model's number of classes."""
    n = x0.shape[0]
    if logits is not None:
        num_classes = logits.shape[1]
    else:
        with torch.no_grad():
            num_classes = logits_of(model, x0[:1]).shape[1]
    if torch.is_tensor(target) and target.dim() == 1:
        if target.shape != (n,):
            raise ValueError(f"target must be one class or one per image ({n}), got shape {tuple(target.shape)}")
        if target.is_floating_point() or bool(((target < 0) | (target >= num_classes)).any()):
            raise ValueError(f"target classes must be integers in [0, {num_classes})")
        return target.to(device=x0.device, dtype=torch.int64)
    return torch.full((n,), check_target(target, num_classes), dtype=torch.int64, device=x0.device)


def _rival_and_target(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rows ``[k, t]``: the strongest rival ``k ≠ t`` and the target, so that the one candidate
    difference ``f = z_t − z_k`` is the target margin (negative until ``t`` is predicted)."""
    t = targets.view(-1, 1)
    rival = z.scatter(1, t, float("-inf")).argmax(dim=1, keepdim=True)
    return torch.cat([rival, t], dim=1)


#: On the CPU, steps whose rows hold at most this many input elements (16 images of 3×32×32)
#: use ``"replicated"`` gradients, larger ones ``"loop"``: replication wins where per-operator
#: overhead dominates (small images, few rows) and loses once the arithmetic does (at 224² a
#: single EfficientNet-Lite0 image: 1.07 s replicated against 0.81 s looped).
REPLICATE_MAX_ELEMENTS = 16 * 3 * 32 * 32


def _auto_gradients(device: torch.device, xa: torch.Tensor) -> str:
    """``gradients="auto"`` for a step on the rows ``xa``: vmapped on CUDA; on the CPU,
    replicated for small inputs, where per-pass overhead dominates, and the loop over a shared
    graph for larger ones."""
    if device.type == "cuda":
        return "batched"
    return "replicated" if xa.numel() <= REPLICATE_MAX_ELEMENTS else "loop"


def _candidate_grads(diffs: torch.Tensor, xa: torch.Tensor, state: dict) -> torch.Tensor:
    """Gradients of every column of ``diffs`` (A×K) w.r.t. ``xa``, as A×K×(xa's image shape).

    With ``state["ok"]``: one vmapped backward pass (``is_grads_batched``) whose
    grad_outputs are the K one-hot column selectors; otherwise one backward per column over
    the same forward graph. Row i of ``diffs`` only depends on row i of ``xa`` (a classifier in eval
    mode maps images independently), so column k's gradient is ``∇ f_k`` for every row.
    ``state["ok"]`` turns False (for the rest of the call) if vmap cannot batch a layer.
    """
    a, kk = diffs.shape
    if state["ok"]:
        eye = torch.eye(kk, device=diffs.device, dtype=diffs.dtype)
        selectors = eye[:, None, :].expand(kk, a, kk)
        try:
            (g,) = torch.autograd.grad(diffs, xa, grad_outputs=selectors, is_grads_batched=True, retain_graph=True)
            return g.transpose(0, 1)
        except RuntimeError as e:  # a layer vmap cannot batch: same result, one backward per class
            state["ok"] = False
            warnings.warn(f"batched gradients unavailable for this model ({e}); using one backward per class",
                          RuntimeWarning, stacklevel=3)
    grads = [torch.autograd.grad(diffs[:, j].sum(), xa, retain_graph=j < kk - 1)[0] for j in range(kk)]
    return torch.stack(grads, dim=1)


#: At most this many input elements go through one gradient pass (copies of ``"replicated"``
#: rows counted), so memory stays bounded at any image size: at 32×32 no DeepFool step comes
#: near it, at 224×224 a step's rows are split into passes of a few images each.
GRADIENT_BUDGET = 2 ** 21


def _chunked_linearise(model: nn.Module, xa: torch.Tensor, cls: torch.Tensor, layout: BatchLayout, gradients: str,
                       state: dict, autocast: torch.dtype | None) -> torch.Tensor:
    """:func:`_linearise` over the rows in chunks of at most :data:`GRADIENT_BUDGET` input elements
    (the same gradients: each row's gradient depends on that row only)."""
    copies = cls.shape[1] - 1 if gradients == "replicated" else 1
    rows = max(1, GRADIENT_BUDGET // (copies * xa[0].numel()))
    if xa.shape[0] <= rows:
        return _linearise(model, xa, cls, layout, gradients, state, autocast)
    return torch.cat([_linearise(model, xa[i:i + rows], cls[i:i + rows], layout, gradients, state, autocast)
                      for i in range(0, xa.shape[0], rows)])


def _linearise(model: nn.Module, xa: torch.Tensor, cls: torch.Tensor, layout: BatchLayout, gradients: str,
               state: dict, autocast: torch.dtype | None) -> torch.Tensor:
    """∇f_k at the rows ``xa`` for every candidate, as A×(K−1)×image (in ``xa``'s dtype).

    The forward pass is the gradients' own, over the still-unfooled rows only: sharing the
    classification pass's graph instead would make every backward pass also run over the rows
    that this step found fooled.
    """
    if gradients == "replicated":
        return _replicated_grads(model, xa, cls, layout, autocast)[1]
    xg, z = layout.logits(model, xa, track=True, autocast=autocast)
    zc = z.to(xa.dtype).gather(1, cls)
    return _candidate_grads(zc[:, 1:] - zc[:, :1], xg, state)


def _replicated_grads(model: nn.Module, xa: torch.Tensor, cls: torch.Tensor,
                      layout: BatchLayout, autocast: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f, ∇f)`` for every candidate of every row, from ONE forward and ONE backward pass.

    Row i of ``xa`` is copied once per candidate (``K = cls.shape[1] − 1`` copies); copy j
    carries ``f_j = z_{cls[i, j+1]} − z_{cls[i, 0]}``. The model maps images independently (eval
    mode), so the gradient of ``Σ f`` w.r.t. copy j is exactly ``∇ f_j`` at row i. This trades
    K× the forward arithmetic for one backward instead of K, which wins when each pass is
    dominated by per-operator overhead rather than arithmetic: single images (Algorithm 1's
    inner step) and small batches on a CPU.
    """
    a, kk = xa.shape[0], cls.shape[1] - 1
    xr, logits = layout.logits(model, xa.detach().repeat_interleave(kk, dim=0), track=True, autocast=autocast)
    logits = logits.to(xa.dtype)  # from autocast's type back to the images' (the gradient is in theirs)
    with torch.enable_grad():
        rows = torch.arange(a * kk, device=xa.device)
        target = cls[:, 1:].reshape(-1)              # copy j of row i → candidate j + 1 of row i
        source = cls[:, :1].repeat_interleave(kk, 0).squeeze(1)
        f = logits[rows, target] - logits[rows, source]
        (g,) = torch.autograd.grad(f.sum(), xr)
    return f.detach().view(a, kk), g.view(a, kk, *xa.shape[1:])
