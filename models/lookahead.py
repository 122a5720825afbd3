"""Lookahead of weights (Zhang et al. 2019, "Lookahead Optimizer: k steps forward, 1 step back")
as airbench uses it (Jordan 2024, §3.5): every ``k`` optimiser steps the *slow* copy moves
towards the trained network, ``slow ← d · slow + (1 − d) · net``, and the network jumps back to
it, ``net ← slow``. The decay ``d`` grows as ``0.95^5 · (t / T)^3`` (:func:`lookahead_decay`),
so early in the run the slow copy just follows the network and near the end it averages over
the last few hundred steps; the final step sets ``d = 1`` (the network becomes the average).

Unlike :func:`models.momentum.update_momentum` (a teacher that never feeds back), this writes
the average back into the trained network, and it averages every floating-point tensor of the
state, BatchNorm running statistics included.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["lookahead_update", "lookahead_decay"]


@torch.no_grad()
def lookahead_update(net: nn.Module, slow: nn.Module, decay: float) -> None:
    """In place, for every floating-point tensor of the two state dicts (same architecture):
    ``slow ← decay · slow + (1 − decay) · net``, then ``net ← slow``.

    Examples:
        >>> net, slow = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> lookahead_update(net, slow, decay=0.5)
        >>> bool(torch.equal(net.weight, slow.weight))
        True
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"lookahead decay must be in [0, 1], got {decay}")
    fast, avg = net.state_dict(), slow.state_dict()
    if fast.keys() != avg.keys():
        raise ValueError("lookahead: the network and its slow copy have different architectures")
    for key, t in fast.items():
        if t.is_floating_point():
            avg[key].lerp_(t, 1.0 - decay)
            t.copy_(avg[key])


def lookahead_decay(steps_done: int, total_steps: int, base: float = 0.95 ** 5) -> float:
    """``base · (steps_done / total_steps)^3``: the slow copy's weight after ``steps_done`` steps."""
    if total_steps <= 0 or not 0 <= steps_done <= total_steps:
        raise ValueError(f"need 0 <= steps_done <= total_steps and total_steps > 0, got {steps_done}, {total_steps}")
    return base * (steps_done / total_steps) ** 3
