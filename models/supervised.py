"""Supervised baseline: the same backbone trained with cross-entropy on labels.

Augmentation is the standard CIFAR recipe (4-pixel padded random crop + horizontal flip,
He et al. 2016 §4.2); label smoothing (Szegedy et al. 2016) regularises the short schedule.
The linear ``head`` doubles as the shipped classifier's probe.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.augment import random_crop_flip
from models.method import Method

__all__ = ["Supervised"]


class Supervised(Method):
    """Backbone + linear classifier trained with (label-smoothed) cross-entropy."""

    name = "supervised"
    defaults = {"optimizer": "sgd", "lr": 0.2, "weight_decay": 5e-4, "warmup_epochs": 2.0}

    def __init__(self, backbone: nn.Module, num_classes: int = 10, label_smoothing: float = 0.1, padding: int = 4):
        super().__init__(backbone)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.head = nn.Linear(backbone.out_dim, num_classes)
        self.label_smoothing, self.padding = label_smoothing, padding
        self._hparams = {"num_classes": num_classes, "label_smoothing": label_smoothing, "padding": padding}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, x: torch.Tensor, y: torch.Tensor, step: int, max_steps: int) -> torch.Tensor:
        logits = self(random_crop_flip(x, self.padding))
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
