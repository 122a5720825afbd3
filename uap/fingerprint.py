"""Content fingerprints of tensors: what identifies a set of images or a model's weights.

One function hashes a tensor's shape, dtype and bytes (SHA-256, read in place, no copy);
run records (:mod:`uap.runs`) store it, and the clean-prediction cache (:mod:`uap.metrics`)
keys on it, so a tensor edited in place — by a torch operation, through ``.data`` or through a
NumPy view, none of which every version counter sees — is another tensor to both.
"""
from __future__ import annotations

import hashlib

import torch

__all__ = ["tensor_fingerprint"]


def tensor_fingerprint(x: torch.Tensor) -> str:
    """SHA-256 (hex) of a tensor's shape, dtype and bytes (identifies a set of images).

    Hashes the CPU tensor's memory in place when it is contiguous (SHA-256 runs at about
    1–2 GB/s, well under the cost of one forward pass over the same images).
    """
    t = x.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()
