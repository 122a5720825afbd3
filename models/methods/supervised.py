"""Supervised baseline: the same backbone trained with cross-entropy on labels.

Augmentation is the standard CIFAR recipe (4-pixel padded random crop + horizontal flip,
He et al. 2016 §4.2); label smoothing (Szegedy et al. 2016) regularises the short schedule.
The linear ``head`` doubles as the shipped classifier's probe.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from models.augment import random_crop_flip
from models.methods.base import TrainingMethod, register_training_method
from uap.options import Options, require

__all__ = ["Supervised", "SupervisedOptions"]


@dataclass(frozen=True)
class SupervisedOptions(Options):
    """``num_classes`` of the head; ``label_smoothing`` of the cross-entropy; ``padding`` of the random crop."""

    num_classes: int = 10
    label_smoothing: float = 0.1
    padding: int = 4

    def check(self) -> None:
        require(0.0 <= self.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


@register_training_method()
class Supervised(TrainingMethod):
    """Backbone + linear classifier trained with (label-smoothed) cross-entropy."""

    name = "supervised"
    Options = SupervisedOptions
    defaults = {"optimizer": "sgd", "lr": 0.2, "weight_decay": 5e-4, "warmup_epochs": 2.0}

    def __init__(self, backbone: nn.Module, options: Mapping[str, Any] | Options | None = None, **hparams: Any):
        super().__init__(backbone, options, **hparams)
        o = self.options
        self.head = nn.Linear(backbone.out_dim, o.num_classes)
        self.label_smoothing, self.padding = o.label_smoothing, o.padding

    def classifier_head(self) -> nn.Linear:
        """The head trained with the backbone: the zoo entry ships it."""
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, x: torch.Tensor, y: torch.Tensor, step: int, max_steps: int) -> torch.Tensor:
        logits = self(random_crop_flip(x, self.padding))
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
