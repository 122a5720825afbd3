"""What a training method is, and where methods are registered, so one loop (``models.train``) runs them all.

A method is an ``nn.Module`` that owns its backbone (``.backbone``, the encoder that ships)
plus whatever else the paper needs (heads, momentum encoder, queue, centre, a text tower),
and one class:

- ``name`` — what ``TrainConfig(method=...)`` (and ``uap train NAME``) calls it;
- ``Options`` — a frozen dataclass of its hyper-parameters (:class:`uap.options.Options`):
  ``-H key=value`` and ``TrainConfig.hparams`` are parsed by it, so an unknown or ill-typed
  one is a ``ValueError`` naming the known ones, and its ``check`` refuses values that cannot
  work before any data is loaded; checkpoints and zoo cards record them (:attr:`TrainingMethod.hparams`);
- ``defaults`` — the optimiser and schedule defaults (``lr`` for a batch of 256,
  ``weight_decay``, ``optimizer``, ``warmup_epochs``);
- ``zoo_builder`` — the :mod:`models.zoo` builder that turns a finished run into a zoo entry.

The loop calls, in this order:

- :meth:`TrainingMethod.param_groups` once, to build the optimiser;
- :meth:`TrainingMethod.prepare_data` once per call of the loop (fresh run or resume), with
  the training images, to set aside what the method validates on;
- :meth:`TrainingMethod.learning_rate`, :meth:`TrainingMethod.training_step` and
  :meth:`TrainingMethod.after_step` for every batch;
- :meth:`TrainingMethod.on_epoch_end` after every epoch; its metrics join the epoch's record.

Augmentations happen inside the method because each paper defines its own views. Whatever a
method draws at random comes from torch's global generators, which the loop checkpoints, so
a resumed run draws exactly what an uninterrupted one would.

:func:`register_training_method` adds a class to the registry; the first lookup imports every
module of the :mod:`models.methods` package, which registers the built-in ones. This module
imports no method at import time, so methods import it (and :mod:`models.train`) freely.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, TypeVar

import torch
from torch import nn

from models.schedules import warmup_cosine_schedule
from uap.options import Options

__all__ = ["TrainingMethod", "NoOptions", "register_training_method", "get_training_method",
           "available_training_methods"]

M = TypeVar("M", bound=type["TrainingMethod"])


@dataclass(frozen=True)
class NoOptions(Options):
    """The hyper-parameters of a method that has none."""


class TrainingMethod(nn.Module):
    """Base class of training methods (see the module docstring).

    Built as ``Method(backbone, options)`` or ``Method(backbone, key=value, …)``: ``options`` is
    an instance of the method's ``Options`` or a mapping, parsed and checked by it."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = NoOptions
    defaults: ClassVar[dict[str, Any]] = {}
    #: Under torch.distributed, BatchNorm becomes GlobalBatchNorm (SimCLR's global BN) unless a
    #: method keeps per-device statistics on purpose (MoCo's shuffling BN).
    global_batchnorm: ClassVar[bool] = True
    #: The name of the :mod:`models.zoo` builder (:func:`models.zoo.register_zoo_builder`) of the
    #: classifier this method ships: ``"probed"`` (encoder + linear head) or ``"clip"`` (zero-shot head).
    zoo_builder: ClassVar[str] = "probed"
    #: The probed zoo entry also measures the shipped classifier under test-time augmentation.
    report_tta: ClassVar[bool] = False
    #: A description of the training recipe for the zoo card (empty: none).
    recipe: ClassVar[str] = ""

    def __init__(self, backbone: nn.Module, options: Mapping[str, Any] | Options | None = None, **hparams: Any):
        super().__init__()
        if not hasattr(backbone, "out_dim"):
            raise ValueError("the backbone must expose .out_dim (its feature size)")
        self.options = self.parse_options(options, **hparams)
        self.backbone = backbone

    @classmethod
    def parse_options(cls, options: Mapping[str, Any] | Options | None = None, **hparams: Any) -> Options:
        """The method's ``Options`` from an instance, a mapping and/or keyword arguments (unknown,
        ill-typed or unworkable values are a ``ValueError`` naming the method and the known ones)."""
        if isinstance(options, cls.Options) and not hparams:
            return options
        values = options.to_dict() if isinstance(options, Options) else dict(options or {})
        return cls.Options.parse({**values, **hparams}, owner=f"training method {cls.name!r}")

    @property
    def hparams(self) -> dict[str, Any]:
        """Every hyper-parameter, defaults included (recorded in checkpoints and model cards)."""
        return self.options.to_dict()

    @property
    def teacher_card(self) -> dict[str, Any] | None:
        """What a zoo card records about the model this one was distilled from (None: not distilled)."""
        return None

    def classifier_head(self) -> nn.Linear | None:
        """The linear head trained with the backbone, which the probed zoo entry ships instead of
        a linear probe (supervised methods); ``None`` for methods without labels."""
        return None

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
        used by the supervised methods)."""
        raise NotImplementedError

    def after_step(self, step: int, max_steps: int) -> None:
        """Called after each optimiser step (EMA updates of teachers / momentum encoders)."""

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """Metrics of the finished epoch ``epoch`` (1-based) for its record in the run's
        history, e.g. a validation score. The loop puts the method back in train mode after."""
        return {}


_METHODS: dict[str, type[TrainingMethod]] = {}


def register_training_method(name: str | None = None) -> Callable[[M], M]:
    """Register a :class:`TrainingMethod` subclass under its ``name`` (or ``name`` if given).

    Usable as ``@register_training_method()``; a taken name is a ``ValueError`` (a method is
    registered once, when its module is imported)."""

    def decorate(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, TrainingMethod)):
            raise ValueError(f"register_training_method takes a TrainingMethod subclass, got {cls!r}")
        key = name or cls.name
        if not key:
            raise ValueError(f"register_training_method needs a name ({cls.__name__} has none)")
        if key in _METHODS and _METHODS[key] is not cls:
            raise ValueError(f"a training method named {key!r} is already registered ({_METHODS[key].__name__})")
        _METHODS[key] = cls
        return cls

    return decorate


_IMPORTED = False


def _builtin() -> None:
    """Import every module of the :mod:`models.methods` package once (their decorators register them)."""
    global _IMPORTED
    if _IMPORTED:
        return
    _IMPORTED = True  # before the imports: a method module may look others up while it loads
    try:
        package = importlib.import_module("models.methods")
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"models.methods.{module.name}")
    except BaseException:
        _IMPORTED = False
        raise


def get_training_method(name: str) -> type[TrainingMethod]:
    """The class registered as ``name``; ``ValueError`` listing the known ones."""
    _builtin()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(_METHODS)}")
    return _METHODS[name]


def available_training_methods() -> list[str]:
    """Registered training method names, in registration order."""
    _builtin()
    return list(_METHODS)
