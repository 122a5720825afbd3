"""BYOL (Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020).

No negatives: the *online* network (backbone → projector → predictor) regresses, with
``2 − 2·cos``, the projection of another view produced by the *target* network (backbone →
projector), whose weights are an EMA of the online ones with ``m`` following a cosine schedule
from ``momentum`` to 1 (§3.2). The loss is symmetrised over the two views. Only the online
backbone is kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from models.augment import SSLAugment
from models.heads import BYOLPredictionHead, BYOLProjectionHead
from models.losses import byol_loss
from models.methods.base import TrainingMethod, register_training_method
from models.momentum import momentum_copy, update_momentum
from models.schedules import cosine_schedule
from uap.options import Options

__all__ = ["BYOL", "BYOLOptions"]


@dataclass(frozen=True)
class BYOLOptions(Options):
    """The target network's starting EMA ``momentum`` (cosine-scheduled to 1); projector and
    predictor output and hidden sizes."""

    momentum: float = 0.96
    proj_dim: int = 128
    hidden_dim: int = 512


@register_training_method()
class BYOL(TrainingMethod):
    """Online network with predictor, EMA target network, normalised-regression loss."""

    name = "byol"
    Options = BYOLOptions
    # Short CIFAR-10 schedules learn faster with a larger step and a faster-moving target than
    # the paper's long ImageNet setting (lr 0.3 and m 0.96 here).
    defaults = {"optimizer": "sgd", "lr": 0.3, "weight_decay": 5e-4, "warmup_epochs": 1.0}

    def __init__(self, backbone: nn.Module, options: Mapping[str, Any] | Options | None = None, **hparams: Any):
        super().__init__(backbone, options, **hparams)
        o = self.options
        self.projector = BYOLProjectionHead(backbone.out_dim, o.hidden_dim, o.proj_dim)
        self.predictor = BYOLPredictionHead(o.proj_dim, o.hidden_dim, o.proj_dim)
        self.target_backbone = momentum_copy(self.backbone)
        self.target_projector = momentum_copy(self.projector)
        self.momentum = o.momentum
        self.augment = SSLAugment()

    def training_step(self, x: torch.Tensor, y: torch.Tensor, step: int, max_steps: int) -> torch.Tensor:
        v = torch.cat([self.augment(x), self.augment(x)])
        p1, p2 = self.predictor(self.projector(self.backbone(v))).chunk(2)
        with torch.no_grad():
            z1, z2 = self.target_projector(self.target_backbone(v)).chunk(2)
        return 0.5 * (byol_loss(p1, z2) + byol_loss(p2, z1))

    def after_step(self, step: int, max_steps: int) -> None:
        m = cosine_schedule(step, max_steps, self.momentum, 1.0)
        update_momentum(self.backbone, self.target_backbone, m)
        update_momentum(self.projector, self.target_projector, m)
