"""SimCLR (Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
ICML 2020).

Per batch: two augmented views of every image → backbone ``f`` → projection head ``g`` →
NT-Xent over the ``2N`` projections (the other ``2N − 2`` views are the negatives, hence the
large batches and LARS of the paper; ``--optimizer lars`` selects it, and under
``torch.distributed`` the loop makes BatchNorm global, :mod:`models.global_batchnorm`, for the "global BN"
of §2.2, and NT-Xent takes its negatives from the global batch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from models.augment import SSLAugment
from models.heads import SimCLRProjectionHead
from models.losses import nt_xent
from models.methods.base import TrainingMethod, register_training_method
from uap.options import Options

__all__ = ["SimCLR", "SimCLROptions"]


@dataclass(frozen=True)
class SimCLROptions(Options):
    """NT-Xent ``temperature``; the projection head's output and hidden sizes."""

    temperature: float = 0.5
    proj_dim: int = 128
    hidden_dim: int = 512


@register_training_method()
class SimCLR(TrainingMethod):
    """Backbone + projection head trained with NT-Xent on two views."""

    name = "simclr"
    Options = SimCLROptions
    defaults = {"optimizer": "sgd", "lr": 0.06, "weight_decay": 5e-4, "warmup_epochs": 1.0}

    def __init__(self, backbone: nn.Module, options: Mapping[str, Any] | Options | None = None, **hparams: Any):
        super().__init__(backbone, options, **hparams)
        o = self.options
        self.projector = SimCLRProjectionHead(backbone.out_dim, o.hidden_dim, o.proj_dim)
        self.temperature = o.temperature
        self.augment = SSLAugment()

    def training_step(self, x: torch.Tensor, y: torch.Tensor, step: int, max_steps: int) -> torch.Tensor:
        v = torch.cat([self.augment(x), self.augment(x)])  # one forward pass for both views
        z1, z2 = self.projector(self.backbone(v)).chunk(2)
        return nt_xent(z1, z2, self.temperature)
