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


def tensor_fingerprint(x) -> str:
    """SHA-256 (hex) of a tensor's shape, dtype and bytes (identifies a set of images).

    Hashes the CPU tensor's memory in place when it is contiguous (SHA-256 is far cheaper than
    one forward pass over the same images). A streamed :class:`uap.images.Images` set is hashed
    batch by batch as the float tensor it stands for, so it has the fingerprint of the same
    images loaded as one tensor.
    """
    from uap.images import is_images

    if is_images(x):
        h = hashlib.sha256(f"{tuple(x.shape)}|{x.dtype}|".encode())
        for xb in x.batches(256):
            h.update(memoryview(xb.contiguous().reshape(-1).view(torch.uint8).numpy()))
        return h.hexdigest()
    t = x.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()
