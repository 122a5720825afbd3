"""BatchNorm over sub-batches: one device behaving like ``g`` devices with per-device BN.

MoCo (He et al. 2020, §3.3 "Shuffling BN") found that BN statistics computed over the batch
that holds both a query and its positive key let the model "cheat" the pretext task: the
batch statistics themselves identify the positive among the queued negatives. MoCo's fix is
per-device BN plus a shuffle of the key batch across devices. On one device the same thing is
obtained by normalising ``g`` sub-batches separately (this module) and permuting the key batch
before the key encoder (``MoCo._keys``), so a query and its key never share statistics.

In eval mode, and for state dicts, :class:`SplitBatchNorm2d` *is* a ``BatchNorm2d``: the
trained encoder is exported and loaded as a plain backbone.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["SplitBatchNorm1d", "SplitBatchNorm2d", "split_batchnorm"]


class _SplitStatistics:
    """Training-mode statistics over ``num_splits`` consecutive equal chunks of the batch
    (running statistics are updated once per chunk); eval mode is the parent's forward."""

    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        if x.shape[0] % self.num_splits:
            raise ValueError(f"batch of {x.shape[0]} does not split into {self.num_splits} equal sub-batches")
        return torch.cat([
            F.batch_norm(chunk, self.running_mean, self.running_var, self.weight, self.bias,
                         True, self.momentum, self.eps)
            for chunk in x.chunk(self.num_splits)
        ])


class SplitBatchNorm1d(_SplitStatistics, nn.BatchNorm1d):
    """``BatchNorm1d`` normalising ``num_splits`` sub-batches separately while training."""


class SplitBatchNorm2d(_SplitStatistics, nn.BatchNorm2d):
    """``BatchNorm2d`` normalising ``num_splits`` sub-batches separately while training."""


_SPLIT = {nn.BatchNorm1d: SplitBatchNorm1d, nn.BatchNorm2d: SplitBatchNorm2d}


def split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """In place: every ``BatchNorm1d``/``BatchNorm2d`` of ``module`` becomes its split version
    with the same parameters and buffers. Returns ``module``."""
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    for name, child in module.named_children():
        split = _SPLIT.get(type(child))
        if split is None:
            split_batchnorm(child, num_splits)
            continue
        bn = split(child.num_features, num_splits, eps=child.eps, momentum=child.momentum,
                   affine=child.affine, track_running_stats=child.track_running_stats)
        bn.load_state_dict(child.state_dict())
        bn.train(child.training)
        setattr(module, name, bn.to(next(iter(child.state_dict().values())).device))
    return module
