"""Supervised training with the airbench recipe (Jordan 2024, "94% on CIFAR-10 in 3.29 Seconds
on a Single GPU"): ~94 % test accuracy in about ten epochs for the :mod:`models.airbench` net.

What differs from the plain supervised baseline (:mod:`models.methods.supervised`), each a section of
the paper:

- **data-fitted first layer**: :meth:`prepare_data` fits the patch-whitening filters on 5 000
  training images; the whitening bias trains for the first ``whiten_bias_epochs`` only;
- **alternating flip** (§3.6): each image gets one random horizontal flip, drawn once; odd
  epochs see every image mirrored relative to even epochs, so each image is seen in both
  orientations every two epochs (instead of a fresh coin per epoch);
- **translate** by up to ``translate`` pixels with reflection padding (no random crop-resize);
- **label smoothing 0.2**, **Nesterov SGD** with momentum 0.85, a large learning rate on the
  BatchNorm biases (``bias_lr_scale`` × the others, weight decay divided by the same factor,
  so every parameter decays at the same rate per step) and the **triangular schedule**
  (0.2 → 1 over the warm-up, then linearly to 0; warm-up = 2 of 10 epochs);
- **lookahead** (:mod:`models.lookahead`) every ``lookahead_every`` steps; after the last step
  the network *is* the slow average. Its decay depends on the run's length, so a resume that
  changes ``--epochs`` during the warm-up is close to (decay ≤ 0.006 there), not exactly, a
  fresh run of the new length.

The learning rate and weight decay are the paper's, for this repo's mean (not summed) loss:
the paper's ``lr = 11.5`` per 1 024 summed examples with momentum 0.85 is ``1.5`` per mean over
a batch of 1 024, i.e. ``0.375`` for the loop's reference batch of 256 (the loop scales it
linearly), and its decay ``0.0153`` becomes ``0.0153 / 11.5`` per unit of learning rate.
The trained head has no bias (the paper's); it ships as a zero bias of the usual linear head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from models.augment import random_translate
from models.lookahead import lookahead_decay, lookahead_update
from models.methods.base import register_training_method
from models.methods.supervised import Supervised
from models.momentum import momentum_copy
from models.schedules import triangular_schedule
from uap.options import Options, require

__all__ = ["Airbench", "AirbenchOptions", "PAPER_LR", "PAPER_WEIGHT_DECAY"]

#: the paper's hyper-parameters, in its own units (per 1 024 examples of a summed loss)
PAPER_LR, PAPER_WEIGHT_DECAY, PAPER_MOMENTUM = 11.5, 0.0153, 0.85
_PAPER_LR_PER_256_MEAN = PAPER_LR / (1024 * (1 + 1 / (1 - PAPER_MOMENTUM))) * 256


@dataclass(frozen=True)
class AirbenchOptions(Options):
    """The recipe's knobs (module docstring): head size, label smoothing, translation in pixels,
    SGD momentum, the BatchNorm biases' lr factor, epochs the whitening bias trains, lookahead
    period, images the whitening is fitted on."""

    num_classes: int = 10
    label_smoothing: float = 0.2
    translate: int = 2
    momentum: float = PAPER_MOMENTUM
    bias_lr_scale: float = 64.0
    whiten_bias_epochs: float = 3.0
    lookahead_every: int = 5
    whitening_images: int = 5000

    @property
    def padding(self) -> int:
        """The translation, under the name :class:`~models.methods.supervised.Supervised` reads."""
        return self.translate

    def check(self) -> None:
        require(self.lookahead_every >= 1 and self.whitening_images >= 1 and self.bias_lr_scale > 0
                and 0 <= self.momentum < 1,
                "need lookahead_every >= 1, whitening_images >= 1, bias_lr_scale > 0, 0 <= momentum < 1")
        require(0.0 <= self.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


@register_training_method()
class Airbench(Supervised):
    """Backbone (``--backbone airbench``) + bias-free linear head, trained by the airbench recipe."""

    name = "airbench"
    Options = AirbenchOptions
    #: :mod:`models.zoo_build` measures test-time augmentation for the card (the entry ships without it)
    report_tta = True
    recipe = ("airbench (Jordan 2024): frozen 2x2 patch-whitening conv fitted on training images, three conv "
              "groups (max-pool, BatchNorm with bias only, GELU), label-smoothed cross-entropy, Nesterov SGD with a "
              "triangular lr and a larger lr on BatchNorm biases, alternating flip + reflect-padded translation, "
              "lookahead; the values are in hyperparameters.method_hparams")
    defaults = {"optimizer": "sgd", "lr": _PAPER_LR_PER_256_MEAN, "weight_decay": PAPER_WEIGHT_DECAY / PAPER_LR,
                "warmup_epochs": 2.0}

    def __init__(self, backbone: nn.Module, options: Mapping[str, Any] | Options | None = None, **hparams: Any):
        if not hasattr(backbone, "fit_whitening"):
            raise ValueError("the airbench method needs the airbench backbone (--backbone airbench)")
        super().__init__(backbone, options, **hparams)
        o = self.options
        with torch.no_grad():
            self.head.bias.zero_()
        self.head.bias.requires_grad_(False)
        self.momentum, self.bias_lr_scale = o.momentum, o.bias_lr_scale
        self.whiten_bias_epochs, self.lookahead_every, self.whitening_images = (o.whiten_bias_epochs, o.lookahead_every,
                                                                                o.whitening_images)
        self.lookahead = momentum_copy(self._trained())  # the slow weights; saved in checkpoints
        self._n_train: int | None = None
        self.to(memory_format=torch.channels_last)  # the faster layout for this net's CPU convolutions

    def _trained(self) -> nn.ModuleDict:
        """The modules whose state lookahead averages (the shipped classifier)."""
        return nn.ModuleDict({"backbone": self.backbone, "head": self.head})

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Convolutions, the whitening bias and the head at the base rate (first group: the rate
        the loop records); BatchNorm biases at ``bias_lr_scale`` × it, weight decay / the same factor."""
        norm_biases = [p for n, p in self.backbone.named_parameters() if ".norm" in n and p.requires_grad]
        ids = {id(p) for p in norm_biases}
        others = [p for p in self._trained().parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": others, "lr_scale": 1.0, "weight_decay": weight_decay, "momentum": self.momentum},
                {"params": norm_biases, "lr_scale": self.bias_lr_scale, "weight_decay": weight_decay / self.bias_lr_scale,
                 "momentum": self.momentum}]

    def learning_rate(self, step: int, max_steps: int, warmup_steps: int, peak: float) -> float:
        """The paper's triangular schedule: 0.2 · peak → peak over the warm-up, then linearly to 0."""
        return triangular_schedule(step, max_steps, warmup_steps, peak)

    def prepare_data(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fit the whitening layer on ``whitening_images`` training images (a fixed subset),
        start the slow weights there, and return the images with a random half mirrored once
        (the alternating flip's per-image coin; torch's global generator, seeded by the loop,
        so a resumed run draws the same coins)."""
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:self.whitening_images]
        self.backbone.fit_whitening(x[pick.to(x.device)])
        lookahead_update(self._trained(), self.lookahead, decay=0.0)  # slow ← net
        coin = torch.rand(len(x), device=x.device) < 0.5
        self._n_train = len(x)
        return torch.where(coin[:, None, None, None], x.flip(-1), x), y

    def _epoch(self, step: int, batch_size: int) -> int:
        """The epoch of ``step``: the loop runs ``n_train // batch_size`` full batches per epoch."""
        if self._n_train is None:
            raise RuntimeError("prepare_data must run before training (the loop calls it)")
        return step // (self._n_train // batch_size)

    def training_step(self, x: torch.Tensor, y: torch.Tensor, step: int, max_steps: int) -> torch.Tensor:
        """Label-smoothed cross-entropy on the batch, mirrored on odd epochs and translated; the
        whitening bias takes gradients only during its first ``whiten_bias_epochs``."""
        epoch = self._epoch(step, len(x))
        steps_per_epoch = self._n_train // len(x)
        self.backbone.whiten.bias.requires_grad_(step < self.whiten_bias_epochs * steps_per_epoch)
        if epoch % 2 == 1:
            x = x.flip(-1)
        logits = self(random_translate(x, self.padding).contiguous(memory_format=torch.channels_last))
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def after_step(self, step: int, max_steps: int) -> None:
        """Lookahead every ``lookahead_every`` steps; after the last step the network is the slow average."""
        done = step + 1
        if done % self.lookahead_every == 0:
            lookahead_update(self._trained(), self.lookahead, lookahead_decay(done, max_steps))
        if done == max_steps:
            lookahead_update(self._trained(), self.lookahead, decay=1.0)
