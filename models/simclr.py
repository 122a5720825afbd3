"""SimCLR (Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
ICML 2020).

Per batch: two augmented views of every image → backbone ``f`` → projection head ``g`` →
NT-Xent over the ``2N`` projections (the other ``2N − 2`` views are the negatives, hence the
large batches and LARS of the paper; ``--optimizer lars`` selects it, and under
``torch.distributed`` the loop makes BatchNorm global, :mod:`models.global_batchnorm`, for the "global BN"
of §2.2, and NT-Xent takes its negatives from the global batch).
"""
from __future__ import annotations

import torch
from torch import nn

from models.augment import SSLAugment
from models.heads import SimCLRProjectionHead
from models.losses import nt_xent
from models.method import Method

__all__ = ["SimCLR"]


class SimCLR(Method):
    """Backbone + projection head trained with NT-Xent on two views."""

    name = "simclr"
    defaults = {"optimizer": "sgd", "lr": 0.06, "weight_decay": 5e-4, "warmup_epochs": 1.0}

    def __init__(self, backbone: nn.Module, temperature: float = 0.5, proj_dim: int = 128, hidden_dim: int = 512):
        super().__init__(backbone)
        self.projector = SimCLRProjectionHead(backbone.out_dim, hidden_dim, proj_dim)
        self.temperature = temperature
        self.augment = SSLAugment()
        self._hparams = {"temperature": temperature, "proj_dim": proj_dim, "hidden_dim": hidden_dim}

    def training_step(self, x: torch.Tensor, y: torch.Tensor, step: int, max_steps: int) -> torch.Tensor:
        v = torch.cat([self.augment(x), self.augment(x)])  # one forward pass for both views
        z1, z2 = self.projector(self.backbone(v)).chunk(2)
        return nt_xent(z1, z2, self.temperature)
