"""Sequence packing: several token sequences run as one, with attention kept inside each.

DINOv2 (Oquab et al. 2023) runs all the multi-crop views of a batch through the transformer
together instead of one forward per crop resolution. Here the sequences of one image's crops
are concatenated into one sequence, and a block-diagonal attention mask keeps every crop's
tokens attending only to that crop's tokens, so each crop sees exactly what a forward of it
alone would (:meth:`models.backbones.VisionTransformer.forward_packed`).
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["block_diagonal_mask"]


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
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"need at least one segment, each of at least one token; got lengths {lengths}")
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                      torch.tensor(lengths, device=device))
    return segment[:, None] == segment[None, :]
