"""Exponential moving average of weights: the momentum encoder of MoCo, BYOL's target
network and DINO's teacher.

``θ_t ← m θ_t + (1 − m) θ_s`` (He et al. 2020 eq. 2; Grill et al. 2020 §3.1; Caron et al.
2021 §3.1). Buffers (BatchNorm running statistics) are copied, not averaged.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["update_momentum", "momentum_copy"]


@torch.no_grad()
def update_momentum(student: nn.Module, teacher: nn.Module, m: float) -> None:
    """In place: every teacher parameter becomes ``m * teacher + (1 - m) * student``.

    Examples:
        >>> s, t = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> update_momentum(s, t, m=0.99)
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum m must be in [0, 1], got {m}")
    s_params, t_params = list(student.parameters()), list(teacher.parameters())
    if len(s_params) != len(t_params):
        raise ValueError("student and teacher have different architectures")
    torch._foreach_mul_(t_params, m)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - m)
    for bs, bt in zip(student.buffers(), teacher.buffers()):
        bt.copy_(bs)


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy of ``module`` (the initial teacher / momentum encoder)."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
