"""MoCo v2 (He et al., "Momentum Contrast", CVPR 2020; Chen et al., "Improved Baselines with
Momentum Contrastive Learning", 2020).

A query encoder (backbone + MLP projection head — the v2 change) is trained with InfoNCE:
the positive key is the *momentum* encoder's embedding of another view of the same image,
negatives are the keys of earlier batches held in a queue. The key encoder follows the query
encoder by EMA, ``θ_k ← m θ_k + (1 − m) θ_q``; the loss is symmetrised over the two views.
Shuffling BN (MoCo §3.3): BatchNorm statistics shared by a query and its positive key let
the model find the positive by its batch statistics instead of its content. As MoCo does
across devices, both encoders normalise ``bn_splits`` sub-batches separately
(:mod:`models.split_batchnorm`) and the key batch is permuted before the key encoder and
restored after it, so a query's sub-batch and its key's sub-batch hold different images.

Under ``torch.distributed`` this is MoCo's own multi-device recipe, with ``bn_splits``
counting the BN groups of the *global* batch (each of ``W`` ranks normalises
``bn_splits / W`` sub-batches of its share, so one process with ``bn_splits = W`` computes
what ``W`` ranks with per-rank BN do): the key inputs of all ranks are gathered, shuffled by
one permutation drawn on rank 0 and broadcast, each rank encodes its share of the shuffled
batch with its own BN statistics, and the keys are gathered and unshuffled. The queue takes
the keys of the global batch, so it is the same on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from models.augment import SSLAugment
from models.heads import ProjectionHead
from models.losses import info_nce
from models.methods.base import TrainingMethod, register_training_method
from models.momentum import momentum_copy, update_momentum
from models.queue import MemoryQueue
from models.schedules import cosine_schedule
from models.split_batchnorm import split_batchnorm
from uap.distributed import all_sum, broadcast, gather_rows, is_main, shard, world
from uap.options import Options

__all__ = ["MoCo", "MoCoOptions"]


@dataclass(frozen=True)
class MoCoOptions(Options):
    """InfoNCE ``temperature``; negative keys in the queue; the key encoder's starting EMA
    ``momentum`` (cosine-scheduled to 1); projection head sizes; BatchNorm groups of the global batch."""

    temperature: float = 0.2
    queue_size: int = 4096
    momentum: float = 0.99
    proj_dim: int = 128
    hidden_dim: int = 512
    bn_splits: int = 8


@register_training_method()
class MoCo(TrainingMethod):
    """Query encoder, momentum key encoder and a queue of negative keys."""

    name = "moco"
    Options = MoCoOptions
    defaults = {"optimizer": "sgd", "lr": 0.06, "weight_decay": 5e-4, "warmup_epochs": 1.0}
    global_batchnorm = False  # per-device (here: per-sub-batch) statistics plus shuffling, §3.3

    def __init__(self, backbone: nn.Module, options: Mapping[str, Any] | Options | None = None, **hparams: Any):
        o = self.parse_options(options, **hparams)
        ranks = world()[1]
        if o.bn_splits < 1 or o.bn_splits % ranks:
            raise ValueError(f"bn_splits ({o.bn_splits}) must be a positive multiple of the {ranks} ranks: it counts "
                             f"the BN groups of the global batch, bn_splits / ranks on each rank")
        local_splits = o.bn_splits // ranks
        super().__init__(split_batchnorm(backbone, local_splits), o)
        self.projector = split_batchnorm(ProjectionHead(backbone.out_dim, o.hidden_dim, o.proj_dim), local_splits)
        self.key_backbone = momentum_copy(self.backbone)
        self.key_projector = momentum_copy(self.projector)
        self.queue = MemoryQueue(o.proj_dim, o.queue_size)
        self.temperature, self.momentum = o.temperature, o.momentum
        self.augment = SSLAugment()

    @torch.no_grad()
    def _keys(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys of v, keys of the global batch)``: key embeddings computed on a shuffled
        batch (so the key encoder's BN groups differ from the query encoder's) and returned in
        the unshuffled order. Distributed, the shuffle spans the ranks' batches: rank 0 draws
        the permutation of the global batch, every rank encodes its share of it."""
        n = int(all_sum(torch.tensor([len(v)])))
        everything = gather_rows(v, n)
        perm = torch.randperm(n, device=v.device) if is_main() else torch.empty(n, dtype=torch.long, device=v.device)
        perm = broadcast(perm)
        keys = gather_rows(self.key_projector(self.key_backbone(everything[perm[shard(n)]])), n)
        keys = torch.empty_like(keys).index_copy_(0, perm, keys)
        return keys[shard(n)], keys

    def training_step(self, x: torch.Tensor, y: torch.Tensor, step: int, max_steps: int) -> torch.Tensor:
        v1, v2 = self.augment(x), self.augment(x)
        q1, q2 = self.projector(self.backbone(v1)), self.projector(self.backbone(v2))
        (k1, all_k1), (k2, all_k2) = self._keys(v1), self._keys(v2)
        negatives = self.queue.keys.clone()
        loss = 0.5 * (info_nce(q1, k2, negatives, self.temperature) + info_nce(q2, k1, negatives, self.temperature))
        self.queue.enqueue(nn.functional.normalize(torch.cat([all_k1, all_k2]), dim=1))
        return loss

    def after_step(self, step: int, max_steps: int) -> None:
        m = cosine_schedule(step, max_steps, self.momentum, 1.0)
        update_momentum(self.backbone, self.key_backbone, m)
        update_momentum(self.projector, self.key_projector, m)
