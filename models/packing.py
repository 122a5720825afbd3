"""Sequence packing: several token sequences run as one, with attention kept inside each.

DINOv2 (Oquab et al. 2023) runs all the multi-crop views of a batch through the transformer
together instead of one forward per crop resolution. Here the sequences of one image's crops
are concatenated into one sequence, and a block-diagonal attention mask keeps every crop's
tokens attending only to that crop's tokens, so each crop sees exactly what a forward of it
alone would (:meth:`models.backbones.VisionTransformer.forward_packed`).

Two ways to keep the crops apart inside the attention, with the same result:

- :func:`block_diagonal_mask`: one dense L×L boolean mask through SDPA's masked path; the
  attention costs L² scores for L packed tokens, most of them masked out;
- :func:`segment_attention`: SDPA within each segment, segments of one length stacked into one
  call; Σᵢ Tᵢ² scores, what a memory-efficient block-diagonal kernel computes.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["block_diagonal_mask", "segment_attention", "PACKED_ATTENTION"]

#: the ways :meth:`~models.backbones.VisionTransformer.forward_packed` can keep crops apart
PACKED_ATTENTION = ("segments", "mask")


def block_diagonal_mask(lengths: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """The L×L boolean attention mask (``True`` = may attend, ``L = sum(lengths)``) of a packed
    sequence made of consecutive segments of ``lengths`` tokens: position ``a`` may attend to
    position ``b`` iff both lie in the same segment.

    Examples:
        >>> block_diagonal_mask([2, 1]).int()
        tensor([[1, 1, 0],
                [1, 1, 0],
                [0, 0, 1]], dtype=torch.int32)
    """
    lengths = _checked(lengths)
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                      torch.tensor(lengths, device=device))
    return segment[:, None] == segment[None, :]


def _checked(lengths: Sequence[int]) -> list[int]:
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"need at least one segment, each of at least one token; got lengths {lengths}")
    return lengths


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Scaled dot-product attention of ``q``, ``k``, ``v`` (N×heads×L×d) within each segment of
    the token axis (consecutive runs of ``lengths`` tokens): the result of SDPA with
    :func:`block_diagonal_mask` (up to rounding), without computing the masked-out scores.
    Segments of equal length go through one SDPA call, stacked along the batch axis."""
    lengths = _checked(lengths)
    if sum(lengths) != q.shape[-2]:
        raise ValueError(f"segments of {lengths} tokens do not cover the {q.shape[-2]} tokens")
    if len(lengths) == 1:
        return F.scaled_dot_product_attention(q, k, v)
    n = q.shape[0]
    parts = [t.split(lengths, dim=-2) for t in (q, k, v)]
    out: list[torch.Tensor | None] = [None] * len(lengths)
    for length in dict.fromkeys(lengths):  # each distinct length once, in order
        idx = [i for i, t in enumerate(lengths) if t == length]
        q_, k_, v_ = (torch.cat([p[i] for i in idx]) for p in parts)  # (g·N)×heads×T×d
        for i, o in zip(idx, F.scaled_dot_product_attention(q_, k_, v_).split(n)):
            out[i] = o
    return torch.cat(out, dim=-2)
