"""Targeted universal perturbations: one ``v`` that sends most images to a chosen class ``t``.

Algorithm 1 of Moosavi-Dezfooli et al. (CVPR 2017) is untargeted; its targeted variant
replaces the inner step and the accept rule::

    for x_i in X (shuffled):
        if k̂(x_i + v) ≠ t:
            Δv_i ← argmin_r ‖r‖₂ s.t. k̂(x_i + v + r) = t          (targeted DeepFool)
            if it converged and m_t(x_i + P(v + Δv_i)) > m_t(x_i + v):
                v ← P_{p,ε}(v + Δv_i)

where ``m_t(x) = z_t(x) − max_{j≠t} z_j(x)`` is the target margin: an update is accepted only
if, *after projection*, it moves ``x_i`` towards the target (a projected step can undo the
DeepFool step; accepting it anyway is how targeted UAPs end up as noise that fools but does
not target). The quality measure is the **targeted success rate**
``mean_i 1[k̂(x_i + v) = t]``, to be read beside the class's base rate ``mean_i 1[k̂(x_i) = t]``.

*Targeted DeepFool* (:func:`targeted_deepfool`) is DeepFool (Moosavi-Dezfooli et al., CVPR
2016) restricted to the target class: at each step it linearises ``f = z_t − z_k`` with ``k``
the strongest rival class and steps to that linearised boundary (ℓ2:
``r = |f|/‖∇f‖₂² ∇f``; ℓ∞: ``r = |f|/‖∇f‖₁ sign(∇f)``), until ``t`` is the predicted class.

The target reaches a method through ``ctx.target`` when the driver provides it, otherwise
through ``method_options={"target": t}`` (see :func:`target_of`).
"""
from __future__ import annotations

import torch
from torch import nn

from uap.methods.algorithm1 import algorithm1_pass
from uap.forward import DEFAULT_BATCH_SIZE, check_images, eval_mode, logits_of, model_device
from uap.metrics import predict
from uap.projection import check_norm
from uap.universal import CraftContext, register_method

__all__ = [
    "targeted_deepfool",
    "targeted_success_rate",
    "target_margin",
    "check_target",
    "target_of",
    "targeted_deepfool_pass",
]

_TINY = 1e-8
_STEP_PAD = 1e-5  # as in uap.deepfool: keeps points clipped at the [0, 1] box moving


def check_target(target: object, num_classes: int) -> int:
    """``target`` as an int class index in ``[0, num_classes)``; ``ValueError`` otherwise."""
    if isinstance(target, bool) or not isinstance(target, (int, torch.Tensor)) or (
        isinstance(target, torch.Tensor) and (target.numel() != 1 or target.is_floating_point())
    ):
        raise ValueError(f"target must be a class index (an integer), got {target!r}")
    t = int(target)
    if not 0 <= t < num_classes:
        raise ValueError(f"target class {t} is out of range: the model has {num_classes} classes (0…{num_classes - 1})")
    return t


def target_of(ctx: CraftContext) -> int | None:
    """The target class of a crafting run (``ctx.target`` or ``ctx.options["target"]``), checked.

    ``None`` means untargeted.
    """
    target = getattr(ctx, "target", None)
    if target is None:
        target = ctx.options.get("target")
    if target is None:
        return None
    with torch.no_grad():
        num_classes = logits_of(ctx.model, ctx.x[:1]).shape[1]
    return check_target(target, num_classes)


def target_margin(logits: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
    """``z_t − max_{j≠t} z_j`` per row: > 0 exactly when ``t`` is the predicted class.

    ``target`` is one class for all rows or an int tensor with one class per row.
    """
    t = torch.as_tensor(target, device=logits.device, dtype=torch.int64).expand(logits.shape[0]).reshape(-1, 1)
    zt = logits.gather(1, t)[:, 0]
    rivals = logits.scatter(1, t, float("-inf"))
    return zt - rivals.max(dim=1).values


def targeted_deepfool(
    model: nn.Module,
    x: torch.Tensor,
    target: int | torch.Tensor,
    *,
    norm: float | int | str = 2,
    overshoot: float = 0.02,
    max_iter: int = 50,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimal perturbations that make ``target`` the predicted class of each image of ``x``.

    Args:
        model: classifier on [0, 1] images (N×C×H×W → N×K logits).
        x: images in [0, 1].
        target: the class to reach — one int for all images, or an int tensor of shape (N,).
        norm: 2 or ``inf`` — the geometry of the step.
        overshoot: the accumulated step is multiplied by ``1 + overshoot`` (as in DeepFool).
        max_iter: maximum number of linearisation steps per image.

    Returns:
        ``(r, success)`` like :func:`uap.deepfool`: ``clip(x + r, 0, 1)`` is the perturbed
        image and ``success[i]`` says whether its prediction is ``target``. Images already
        predicted as the target get ``r = 0`` and ``success = True``.
    """
    check_images(x)
    p = check_norm(norm)
    if p == 1.0:
        raise ValueError("targeted_deepfool supports norm 2 or inf")
    if not overshoot >= 0:
        raise ValueError(f"overshoot must be ≥ 0, got {overshoot!r}")
    if not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be an integer ≥ 0, got {max_iter!r}")
    device = model_device(model)
    x0 = x.detach().to(device)
    n = x0.shape[0]
    total = torch.zeros_like(x0)
    success = torch.zeros(n, dtype=torch.bool, device=device)
    with eval_mode(model):
        with torch.no_grad():
            num_classes = logits_of(model, x0[:1]).shape[1]
        if torch.is_tensor(target) and target.dim() == 1:
            if target.shape != (n,):
                raise ValueError(f"target must be one class or one per image ({n}), got shape {tuple(target.shape)}")
            targets = target.to(device=device, dtype=torch.int64)
            if bool(((targets < 0) | (targets >= num_classes)).any()):
                raise ValueError(f"target classes must be in [0, {num_classes})")
        else:
            targets = torch.full((n,), check_target(target, num_classes), dtype=torch.int64, device=device)
        active = torch.arange(n, device=device)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        for step in range(max_iter + 1):
            xa = (x0[active] + (1.0 + overshoot) * total[active]).clamp(0.0, 1.0).requires_grad_(True)
            with torch.enable_grad():
                logits = logits_of(model, xa)
                margin = target_margin(logits, targets[active])
            done = margin > 0
            success[active[done]] = True
            keep = ~done
            if step == max_iter or not bool(keep.any()):
                break
            # f = z_t − z_k for the strongest rival k; its gradient, one backward for all rows
            (w,) = torch.autograd.grad(margin.sum(), xa)
            f, w = margin.detach()[keep], w[keep]
            flat = w.flatten(1)
            if p == 2.0:
                dual = flat.norm(dim=1)
                r = ((f.abs() / (dual + _TINY) + _STEP_PAD) / (dual + _TINY)).view(shape) * w
            else:
                dual = flat.abs().sum(dim=1)
                r = (f.abs() / (dual + _TINY) + _STEP_PAD).view(shape) * w.sign()
            active = active[keep]
            total[active] += r
    return ((1.0 + overshoot) * total).to(x.device), success.to(x.device)


@torch.no_grad()
def targeted_success_rate(
    model: nn.Module,
    x: torch.Tensor,
    v: torch.Tensor | None,
    target: int,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> float:
    """``mean_i 1[k̂(clip(x_i + v)) = target]``; with ``v=None`` the class's base rate on ``x``."""
    pred = predict(model, x, v, batch_size=batch_size)
    return (pred == int(target)).sum().item() / len(pred)


@register_method("deepfool-targeted")
def targeted_deepfool_pass(ctx: CraftContext) -> None:
    """One pass of targeted Algorithm 1 (module docstring); needs a target class.

    Options (``method_options``): ``target`` (required unless the driver passes one),
    ``batch_size`` (1 = Algorithm 1 exactly; > 1 = batched inner steps), ``chunk_size``.
    DeepFool's ``norm``, ``overshoot`` and ``max_iter`` come from ``deepfool_options``
    (``candidates`` does not apply: the only candidate is the target). Like the untargeted
    passes it runs ``ctx.classifier``, the batch-norm-folded copy of the model (:mod:`uap.fold`).
    """
    target = target_of(ctx)
    if target is None:
        raise ValueError("method 'deepfool-targeted' needs a target class (target=CLASS)")
    df = ctx.deepfool_options
    options = {k: df[k] for k in ("norm", "overshoot", "max_iter") if k in df}

    @torch.no_grad()
    def margin_at(idx: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return target_margin(ctx.classifier((ctx.x[idx] + v).clamp(0.0, 1.0)), target)

    def todo(idx: torch.Tensor) -> torch.Tensor:
        return margin_at(idx, ctx.v) <= 0

    def step(xp: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return targeted_deepfool(ctx.classifier, xp, target, **options)

    def accept(i: torch.Tensor, candidate: torch.Tensor) -> bool:
        return bool(margin_at(i, candidate)[0] > margin_at(i, ctx.v)[0])

    algorithm1_pass(ctx, step, todo=todo, accept=accept, batch_size=int(ctx.options.get("batch_size", 1)))

