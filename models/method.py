"""The interface every training method implements, so one loop (``models.train``) runs them all.

A method is an ``nn.Module`` that owns its backbone (``.backbone``, the encoder that ships)
plus whatever else the paper needs (heads, momentum encoder, queue, centre, a text tower).
The loop calls, in this order:

- :meth:`Method.param_groups` once, to build the optimiser;
- :meth:`Method.prepare_data` once per call of the loop (fresh run or resume), with the
  training images, to set aside what the method validates on;
- :meth:`Method.learning_rate`, :meth:`Method.training_step` and :meth:`Method.after_step`
  for every batch;
- :meth:`Method.on_epoch_end` after every epoch; its metrics join the epoch's record.

Augmentations happen inside the method because each paper defines its own views. Whatever a
method draws at random comes from torch's global generators, which the loop checkpoints, so
a resumed run draws exactly what an uninterrupted one would.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from models.schedules import warmup_cosine_schedule

__all__ = ["Method"]


class Method(nn.Module):
    """Base class. Subclasses set ``name``, ``defaults`` (optimiser and schedule defaults:
    ``lr`` for a batch of 256, ``weight_decay``, ``optimizer``, ``warmup_epochs``) and
    implement :meth:`training_step`. Their ``__init__`` keyword arguments (after
    ``backbone``) are the method's hyper-parameters (``-H key=value`` on the CLI)."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    #: Under torch.distributed, BatchNorm becomes GlobalBatchNorm (SimCLR's global BN) unless a
    #: method keeps per-device statistics on purpose (MoCo's shuffling BN).
    global_batchnorm: ClassVar[bool] = True
    #: The :mod:`models.zoo` builder of the classifier this method ships: ``"probed"`` (encoder
    #: + linear head) or ``"clip"`` (zero-shot head from text prompts).
    zoo_builder: ClassVar[str] = "probed"

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

    @classmethod
    def check_hparam_values(cls, hparams: dict[str, Any]) -> None:
        """``ValueError`` for a hyper-parameter value that cannot work, found without building
        anything (e.g. a path that does not exist); :func:`models.train.check_hparams` calls it
        with the hyper-parameters a run sets, before any data is loaded. The default checks
        nothing."""

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups: ``weight_decay`` on weight matrices and kernels, none on
        biases and normalisation parameters (1-D tensors), as in SimCLR/BYOL/DINO. A group may
        carry any per-group optimiser option (e.g. AdamW's ``betas``) and an ``lr_scale``: the
        loop sets its learning rate to ``lr_scale`` × :meth:`learning_rate`."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
                {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]

    def prepare_data(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training images (in [0, 1]) and labels the loop should train on, given all of
        them. The default trains on everything; a method that validates on held-out training
        images keeps them here. Must be deterministic: it runs again on resume."""
        return x, y

    def learning_rate(self, step: int, max_steps: int, warmup_steps: int, peak: float) -> float:
        """The learning rate of ``step`` (a pure function of the step, so runs resume exactly):
        linear warm-up to ``peak`` over ``warmup_steps``, then cosine decay to 0."""
        return warmup_cosine_schedule(step, max_steps, warmup_steps, peak)

    def training_step(self, x: torch.Tensor, y: torch.Tensor, step: int, max_steps: int) -> torch.Tensor:
        """Loss for one batch of raw training images ``x`` in [0, 1] (labels ``y`` are only
        used by the supervised baseline)."""
        raise NotImplementedError

    def after_step(self, step: int, max_steps: int) -> None:
        """Called after each optimiser step (EMA updates of teachers / momentum encoders)."""

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """Metrics of the finished epoch ``epoch`` (1-based) for its record in the run's
        history, e.g. a validation score. The loop puts the method back in train mode after."""
        return {}
