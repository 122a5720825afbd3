"""Batch normalisation over the global batch of a data-parallel run (SimCLR §2.2 "Global BN").

Per-rank statistics let a contrastive model cheat: the positive pair's shared batch
statistics identify it among the negatives. :class:`GlobalBatchNorm` normalises with the mean
and variance of every rank's batch together, exactly as one process normalising the whole
batch would, with gradients through the statistics flowing to every rank. It is the maths of
``torch.nn.SyncBatchNorm``, which torch runs on GPUs only (its forward refuses CPU tensors and
DDP refuses it in CPU modules); this one runs on any device and backend, with one all-reduce
of ``2C + 1`` numbers per layer forward and one backward.

Each rank contributes ``(Σx, Σ(x − x̄_r)² + n_r x̄_r², n_r)`` (its sum, and its centred
sum of squares shifted back, which is better conditioned than a raw ``Σx²``); the sums give
the global mean and biased variance for normalising, and the unbiased variance for the
running statistics, as ``BatchNorm`` does. In eval mode, without a process group, and in its
state dict it *is* a ``BatchNorm``: trained encoders export as plain backbones.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from uap.distributed import all_sum_with_grad, is_distributed

__all__ = ["GlobalBatchNorm", "global_batchnorm"]


class GlobalBatchNorm(_BatchNorm):
    """``BatchNorm1d``/``2d`` whose training statistics are those of the global batch."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N×C…), got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or not is_distributed():
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        n_local = x.numel() // x.shape[1]
        local_mean = x.mean(dims) if n_local else x.new_zeros(x.shape[1])
        centred = ((x - local_mean.view(shape)) ** 2).sum(dims)
        packed = torch.cat([x.sum(dims), centred + n_local * local_mean ** 2, x.new_tensor([float(n_local)])])
        total = all_sum_with_grad(packed.float())
        c = x.shape[1]
        count = total[-1]
        mean = total[:c] / count
        var = (total[c:2 * c] / count - mean ** 2).clamp_min(0)  # biased: what normalises the batch
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                unbiased = var.detach() * count / (count - 1).clamp_min(1)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        out = (x - mean.view(shape).to(x.dtype)) * torch.rsqrt(var.view(shape) + self.eps).to(x.dtype)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def global_batchnorm(module: nn.Module) -> nn.Module:
    """In place: every ``BatchNorm1d``/``BatchNorm2d`` of ``module`` becomes a
    :class:`GlobalBatchNorm` holding the same parameter and buffer objects (so frozen
    parameters stay frozen). Returns ``module``."""
    for name, child in module.named_children():
        if type(child) not in (nn.BatchNorm1d, nn.BatchNorm2d):
            global_batchnorm(child)
            continue
        bn = GlobalBatchNorm(child.num_features, eps=child.eps, momentum=child.momentum, affine=child.affine,
                             track_running_stats=child.track_running_stats)
        if child.affine:  # the same Parameter objects: a frozen teacher's stay frozen
            bn.weight, bn.bias = child.weight, child.bias
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(bn, key, getattr(child, key))
        bn.train(child.training)
        setattr(module, name, bn)
    return module
