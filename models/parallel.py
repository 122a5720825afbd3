"""Data-parallel training over ``torch.distributed``: how the one loop (:mod:`models.train`)
spreads a method's steps over the ranks.

Every rank holds the whole method and trains on its :func:`uap.distributed.shard` of each
global batch. The loss each rank back-propagates is its share of the global batch's loss
(:func:`rank_share`), so after the gradient all-reduce every rank holds the gradient of the
one-process loss of the global batch, and the ranks' optimiser steps stay identical. What
crosses ranks inside a step is up to the method (global BatchNorm, gathered negatives, MoCo's
shuffle, DINO's centre); what crosses ranks between the forward pass and the optimiser step
is the strategy's:

- ``ddp`` — :class:`torch.nn.parallel.DistributedDataParallel`: every rank keeps every
  parameter and optimiser buffer; gradients are all-reduced (averaged) in buckets during
  the backward pass.
- ``fsdp`` — PyTorch's FSDP2 (:func:`torch.distributed.fsdp.fully_shard`): parameters,
  gradients and optimiser state are sharded over the ranks, one unit per transformer block
  (the ViT's and the text tower's) or residual block (ResNet) plus one for the rest;
  a unit's parameters are all-gathered just before it runs and gradients reduce-scattered
  after. Momentum teachers are sharded in the same layout as their students, so the EMA
  update is shard by shard.

Both wrap :class:`TrainingStep`, the method's ``training_step`` as a module's ``forward``
(DDP and FSDP act through forward hooks). Checkpoints hold full tensors either way
(:func:`full_tensor`), in the one-process layout, so a run may resume under the other
strategy, or without a process group.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from models.methods.base import TrainingMethod
from uap.distributed import is_distributed, shard, world

__all__ = ["STRATEGIES", "TrainingStep", "parallelize", "rank_rows", "rank_share", "sharding_units",
           "full_tensor", "like_param", "unsharded"]

STRATEGIES = ("ddp", "fsdp")


class TrainingStep(nn.Module):
    """``forward(x, y, step, max_steps)`` is ``method.training_step``: the module DDP or FSDP wraps."""

    def __init__(self, method: TrainingMethod):
        super().__init__()
        self.method = method

    def forward(self, x: torch.Tensor, y: torch.Tensor, step: int, max_steps: int) -> torch.Tensor:
        return self.method.training_step(x, y, step, max_steps)


def rank_rows(batch_size: int) -> slice:
    """This rank's rows of every global batch of ``batch_size`` images (``shard``: ⌊B/W⌋ or ⌈B/W⌉)."""
    ranks = world()[1]
    if batch_size < ranks:
        raise ValueError(f"batch_size {batch_size} is smaller than the {ranks} ranks: every rank needs an image")
    return shard(batch_size)


def rank_share(batch_size: int) -> float:
    """This rank's fraction ``n_r / B`` of a global batch: weighting each rank's mean loss by
    it makes the ranks' losses sum to the mean over the global batch, also when ``B`` does not
    divide by the number of ranks."""
    rows = rank_rows(batch_size)
    return (rows.stop - rows.start) / batch_size


def sharding_units(method: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: transformer blocks (ViT, text tower) and residual
    blocks, students and teachers alike, in module order."""
    from models.backbones import BasicBlock, Block
    from models.text_transformer import TextBlock

    return [m for m in method.modules() if isinstance(m, (Block, TextBlock, BasicBlock))]


def parallelize(method: TrainingMethod, strategy: str = "ddp") -> nn.Module:
    """The module whose ``forward(x, y, step, max_steps)`` runs one training step of ``method``
    on this rank's share of the batch: :class:`TrainingStep` itself without a process group,
    wrapped by DDP, or sharded in place by FSDP (build the optimiser *after* this call then:
    FSDP replaces the parameters by their shards)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    step = TrainingStep(method)
    if not is_distributed():
        return step
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = next(method.parameters()).device
        # Buffers are not broadcast: SyncBN statistics, MoCo's queue and DINO's centre are
        # kept equal by the methods' own collectives, MoCo's per-rank BN statistics are per rank.
        return DistributedDataParallel(step, device_ids=[device] if device.type == "cuda" else None,
                                       broadcast_buffers=False)
    from torch.distributed.fsdp import fully_shard

    for unit in sharding_units(method):
        fully_shard(unit)
    fully_shard(step)
    return step


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: an FSDP shard (a ``DTensor``) is all-gathered (every rank must call this
    for the same tensors in the same order); a plain tensor is returned as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like_param(full: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``current``: this rank's shard if ``current`` is an FSDP ``DTensor``
    (for loading a full checkpoint into a sharded model or optimiser), else ``full`` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(current, DTensor):
        return full
    return distribute_tensor(full.to(current.device, current.dtype), current.device_mesh, current.placements)


@contextlib.contextmanager
def unsharded(step: nn.Module) -> Iterator[None]:
    """Within the block the parameters outside FSDP's per-block units are whole, so parts of
    the method (the backbone for the kNN monitor, a zero-shot head) run without the root's
    forward; the blocks gather their own shards when they run. Every rank must enter the
    block and run the same forward passes. A no-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(step, FSDPModule):
        yield
        return
    step.unshard()
    try:
        yield
    finally:
        step.reshard()
