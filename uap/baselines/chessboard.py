"""The chessboard family: ``chessboard1/2/4/8`` — a ±1 chessboard with square cells of 1, 2, 4
or 8 pixels, the same sign on every channel, scaled to the budget (±ε for ℓ∞) — and
``chessboard1n/2n/4n/8n``, the same boards negated (a model need not respond to a pattern and
its negation alike, and the sign is arbitrary).

A fixed, data-free, gradient-free pattern; high-frequency patterns like these fool CIFAR CNNs
far more than random noise of the same norm.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from uap.baselines.base import (
    Baseline,
    BaselineContext,
    _check_budget,
    _check_image_shape,
    _to_norm,
    register_baseline,
)

__all__ = ["chessboard", "Chessboard", "CHESSBOARD_CELLS", "CHESSBOARDS"]

#: Cell sizes (pixels) of the ``chessboard<k>`` baselines.
CHESSBOARD_CELLS = (1, 2, 4, 8)

#: The chessboards: ``chessboard<k>`` (top-left cell +ε) and ``chessboard<k>n`` (its negation,
#: top-left −ε). The sign is arbitrary and a model's response to the two is not symmetric, so
#: both are rows.
CHESSBOARDS = tuple(f"chessboard{c}{s}" for c in CHESSBOARD_CELLS for s in ("", "n"))

#: ``{variant: (cell, sign)}``.
_BOARDS = {f"chessboard{c}{s}": (c, sign) for c in CHESSBOARD_CELLS for s, sign in (("", 1), ("n", -1))}


def chessboard(
    shape: Sequence[int],
    eps: float,
    p: float = math.inf,
    *,
    cell: int = 2,
    sign: int = 1,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A ±1 chessboard of ``cell``×``cell``-pixel squares, scaled to ``‖r‖p = eps`` exactly.

    ``r[c, h, w] ∝ sign · (−1)^(⌊h / cell⌋ + ⌊w / cell⌋)``: the top-left cell has the sign
    ``sign`` (+1 or −1) and every channel carries the same sign (a grey-level pattern). Every pixel has the same magnitude,
    so for ℓ∞ it is ±ε and for ℓ2 / ℓ1 it is ``ε / √(CHW)`` / ``ε / (CHW)``. A cell of 1 is the
    highest spatial frequency an image can carry; the pattern needs no data, no model and no
    seed.
    """
    c, h, w = _check_image_shape(shape)
    eps, p = _check_budget(eps, p)
    if isinstance(cell, bool) or not isinstance(cell, int) or cell <= 0:
        raise ValueError(f"cell must be a positive number of pixels, got {cell!r}")
    if sign not in (1, -1) or isinstance(sign, bool):
        raise ValueError(f"sign must be 1 or -1, got {sign!r}")
    rows = torch.arange(h) // cell
    cols = torch.arange(w) // cell
    board = sign * (1.0 - 2.0 * ((rows[:, None] + cols[None, :]) % 2).to(torch.float64))
    return _to_norm(board.expand(c, h, w), eps, p, dtype)


@register_baseline()
class Chessboard(Baseline):
    """Chessboards of every cell size in both signs (:func:`chessboard`); ``chessboard`` selects
    them all."""

    name = "chessboard"
    variants = CHESSBOARDS

    def make(self, variant: str, ctx: BaselineContext) -> torch.Tensor:
        cell, sign = _BOARDS[variant]
        return chessboard(ctx.shape, ctx.eps, ctx.p, cell=cell, sign=sign)
