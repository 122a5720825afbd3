"""DINO (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021).

Self-distillation without labels: a student (backbone + DINO head) sees all multi-crop views
(2 global + several small local crops); a teacher — an EMA of the student,
``θ_t ← m θ_t + (1 − m) θ_s`` with ``m`` cosine-scheduled to 1 — sees only the 2 global views.
The student matches the teacher's centred and sharpened distribution on every *other* view
(:class:`models.losses.DINOLoss`); centring + low teacher temperature prevent collapse.

With a ViT backbone the student encodes all its views in one packed forward and the teacher
its two global views in another (``packed=True``; sequence packing as in DINOv2:
:meth:`models.backbones.VisionTransformer.forward_packed`); each view still attends only to
itself. ``packed=False``, and backbones without ``forward_packed`` (ResNets, whose BatchNorm
statistics are per forward), take one forward per crop resolution instead.
:func:`encode_views` is that forward; :mod:`models.methods.dino_distill` reuses it with a frozen teacher.

Defaults are set for short CIFAR-10 schedules rather than the paper's long ImageNet one:
AdamW lr 2e-3, 4 096 prototypes, 2 local crops, teacher momentum 0.96 → 1 and a fixed
teacher temperature of 0.04, because the paper's values (lr 5e-4, momentum 0.996, teacher
temperature warmed from 0.04 to 0.07) learn more slowly on a short schedule; pass them as
hyper-parameters to reproduce the paper.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from models.augment import MultiCrop
from models.heads import DINOHead
from models.losses import DINOLoss
from models.methods.base import TrainingMethod, register_training_method
from models.momentum import momentum_copy, update_momentum
from models.schedules import cosine_schedule
from uap.options import Options

__all__ = ["DINO", "DINOOptions", "encode_views"]


def encode_views(backbone: nn.Module, head: nn.Module, views: list[torch.Tensor],
                 packed: bool = True) -> list[torch.Tensor]:
    """``head(backbone(v))`` for every view ``v`` (2 global views first, then the local ones):
    one packed forward over all of them when the backbone packs and ``packed`` is set,
    otherwise one forward per resolution (the global views together, the local views together)."""
    n = len(views[0])
    if packed and hasattr(backbone, "forward_packed"):
        return list(head(torch.cat(backbone.forward_packed(views))).split(n))
    groups = (views[:2], views[2:])
    return [z for group in groups if group for z in head(backbone(torch.cat(group))).split(n)]


@dataclass(frozen=True)
class DINOOptions(Options):
    """Prototypes (``out_dim``); the teacher's starting EMA ``momentum`` (cosine-scheduled to 1);
    local crops per image; the :class:`models.losses.DINOLoss` temperatures, teacher-temperature
    warm-up and centre momentum; one packed forward per network (``packed``, ViT backbones)."""

    out_dim: int = 4096
    momentum: float = 0.96
    n_local: int = 2
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_steps: int = 1000
    center_momentum: float = 0.9
    packed: bool = True


@register_training_method()
class DINO(TrainingMethod):
    """Student/teacher self-distillation with multi-crop, centring and sharpening."""

    name = "dino"
    Options = DINOOptions
    defaults = {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.04, "warmup_epochs": 2.0}

    def __init__(self, backbone: nn.Module, options: Mapping[str, Any] | Options | None = None, **hparams: Any):
        super().__init__(backbone, options, **hparams)
        o = self.options
        self.head = DINOHead(backbone.out_dim, o.out_dim)
        self.teacher_backbone = momentum_copy(self.backbone)
        self.teacher_head = momentum_copy(self.head)
        self.criterion = DINOLoss(o.out_dim, o.student_temp, o.teacher_temp, o.warmup_teacher_temp,
                                  o.warmup_teacher_steps, o.center_momentum)
        self.multicrop = MultiCrop(n_local=o.n_local)
        self.momentum = o.momentum
        self.packed = o.packed

    def training_step(self, x: torch.Tensor, y: torch.Tensor, step: int, max_steps: int) -> torch.Tensor:
        views = self.multicrop(x)
        with torch.no_grad():
            teacher = encode_views(self.teacher_backbone, self.teacher_head, views[:2], self.packed)
        student = encode_views(self.backbone, self.head, views, self.packed)
        return self.criterion(student, teacher, step)

    def after_step(self, step: int, max_steps: int) -> None:
        m = cosine_schedule(step, max_steps, self.momentum, 1.0)
        update_momentum(self.backbone, self.teacher_backbone, m)
        update_momentum(self.head, self.teacher_head, m)
