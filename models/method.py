"""The interface every training method implements, so one loop (``models.train``) runs them all.

A method is an ``nn.Module`` that owns its backbone (``.backbone``, the encoder that ships)
plus whatever else the paper needs (heads, momentum encoder, queue, centre). The loop only
calls :meth:`Method.training_step` and :meth:`Method.after_step`; augmentations happen inside
the method because each paper defines its own views.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["Method"]


class Method(nn.Module):
    """Base class. Subclasses set ``name``, ``defaults`` (optimiser and schedule defaults:
    ``lr`` for a batch of 256, ``weight_decay``, ``optimizer``, ``warmup_epochs``) and
    implement :meth:`training_step`."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    #: Under torch.distributed, BatchNorm becomes SyncBatchNorm (SimCLR's global BN) unless a
    #: method keeps per-device statistics on purpose (MoCo's shuffling BN).
    global_batchnorm: ClassVar[bool] = True

    def __init__(self, backbone: nn.Module):
        super().__init__()
        if not hasattr(backbone, "out_dim"):
            raise ValueError("the backbone must expose .out_dim (its feature size)")
        self.backbone = backbone
        self._hparams: dict[str, Any] = {}

    @property
    def hparams(self) -> dict[str, Any]:
        """Method-specific hyper-parameters (recorded in checkpoints and model cards)."""
        return dict(self._hparams)

    def training_step(self, x: torch.Tensor, y: torch.Tensor, step: int, max_steps: int) -> torch.Tensor:
        """Loss for one batch of raw training images ``x`` in [0, 1] (labels ``y`` are only
        used by the supervised baseline)."""
        raise NotImplementedError

    def after_step(self, step: int, max_steps: int) -> None:
        """Called after each optimiser step (EMA updates of teachers / momentum encoders)."""
