"""Targeted universal perturbations: the target class, its margin, and the success rate.

A targeted UAP sends most images to one chosen class ``t``. Its quality measure is the
**targeted success rate** ``mean_i 1[k̂(x_i + v) = t]``, to be read beside the class's base
rate ``mean_i 1[k̂(x_i) = t]``. The **target margin** ``m_t(x) = z_t(x) − max_{j≠t} z_j(x)`` is
positive exactly when ``t`` is the predicted class; targeted DeepFool linearises it, and
targeted Algorithm 1 accepts an update only if it raises it.
"""
from __future__ import annotations

import torch
from torch import nn

from uap.forward import DEFAULT_BATCH_SIZE
from uap.metrics import predict

__all__ = ["check_target", "target_margin", "targeted_success_rate"]


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


def target_margin(logits: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
    """``z_t − max_{j≠t} z_j`` per row: > 0 exactly when ``t`` is the predicted class.

    ``target`` is one class for all rows or an int tensor with one class per row.
    """
    t = torch.as_tensor(target, device=logits.device, dtype=torch.int64).expand(logits.shape[0]).reshape(-1, 1)
    zt = logits.gather(1, t)[:, 0]
    rivals = logits.scatter(1, t, float("-inf"))
    return zt - rivals.max(dim=1).values


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
