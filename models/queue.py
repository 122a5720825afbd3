"""MoCo's dictionary as a queue (He et al. 2020 §3.2): the newest mini-batch of keys is
enqueued, the oldest dequeued, so negatives can far outnumber the batch size while staying
consistent (they come from a slowly-moving momentum encoder)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MemoryQueue"]


class MemoryQueue(nn.Module):
    """A fixed-size ring buffer of ``size`` keys of dimension ``dim`` (stored as buffers, so it
    is checkpointed with the model). Initialised with random unit vectors, as in MoCo."""

    def __init__(self, dim: int, size: int = 4096):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue size and dim must be >= 1, got size={size}, dim={dim}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Overwrite the oldest entries with ``keys`` (N×dim), wrapping around the end."""
        if keys.ndim != 2 or keys.shape[1] != self.keys.shape[1]:
            raise ValueError(f"keys must be N×{self.keys.shape[1]}, got {tuple(keys.shape)}")
        keys = keys.detach()[-self.size:]  # more keys than slots: only the newest survive
        idx = (self.ptr + torch.arange(len(keys), device=keys.device)) % self.size
        self.keys[idx] = keys.to(self.keys.dtype)
        self.ptr.fill_((int(self.ptr) + len(keys)) % self.size)
