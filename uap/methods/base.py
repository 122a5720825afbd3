"""What a crafting method is, what it sees during a pass, and where methods are registered.

:func:`uap.craft` runs the outer loop that every universal perturbation shares — passes over
the crafting set in a seeded visiting order, the stop rule on Err(X_v), the per-pass history,
the callback, resuming — and hands each pass to a :class:`Method`. A method is one class:

- ``name`` — what ``method=`` (and ``uap craft --method``) calls it;
- ``Options`` — a frozen dataclass of its knobs (:class:`uap.options.Options`): unknown or
  ill-typed options are a ``ValueError`` naming the known ones;
- ``supports_target`` / ``requires_target`` — whether it can craft (or only crafts) targeted
  UAPs; what success means comes with the context (``ctx.criterion``, :mod:`uap.criteria`),
  so a method asks it instead of testing for a target;
- ``needs_data`` — whether ``run_pass`` reads the crafting images (``ctx.x``); a method that
  needs none (a data-free objective) may be crafted with ``x=None``, and may depend on its
  options (a property);
- ``ensembles`` — whether ``run_pass`` itself crafts against every model of an ensemble
  (``ctx.members()``); the projected-ascent methods are ensembled by :mod:`uap.methods.ensemble`;
- ``counters`` — the names of the work counters it keeps (``ctx.count(name, n)``); the driver
  copies them into every pass record and progress event;
- ``describe(device)`` — facts about its run for the result's ``extra`` (e.g. a setting
  resolved for the device);
- ``run_pass(ctx)`` — one pass over ``ctx.order``: visit images, update ``ctx.v`` (keeping it
  in the ball with ``ctx.project``), count the work in ``ctx``.

:func:`register_method` adds a class (or a plain ``fn(ctx)`` for quick experiments) to the
registry; with ``prefix=True`` it answers every ``"name:ARG"`` (e.g. ``"foolbox:DDNAttack"``).
This module imports no method, so methods import it and never the reverse.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from uap.criteria import Criterion
from uap.fold import count_batchnorm, fold_batchnorm
from uap.forward import BatchLayout
from uap.options import Options
from uap.projection import project_lp

__all__ = [
    "Method",
    "NoOptions",
    "CraftContext",
    "Callback",
    "register_method",
    "get_method",
    "make_method",
    "available_methods",
]

Callback = Callable[[dict], Any]


@dataclass(frozen=True)
class NoOptions(Options):
    """The options of a method that has none."""


class Method:
    """Base class of crafting methods (see the module docstring)."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = NoOptions
    supports_target: ClassVar[bool] = False
    requires_target: ClassVar[bool] = False
    needs_data: ClassVar[bool] = True
    ensembles: ClassVar[bool] = False
    counters: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Mapping[str, Any] | Options | None = None, *, name: str | None = None) -> None:
        self.name = name or type(self).name
        self.options = self.Options.parse(options, owner=f"method {self.name!r}")

    def run_pass(self, ctx: CraftContext) -> None:
        """One pass over ``ctx.order`` (see the module docstring)."""
        raise NotImplementedError

    def describe(self, device: torch.device) -> dict[str, Any]:
        """Facts about this method's run on ``device`` for the result's ``extra`` (merged into it;
        called once, before the first pass). None by default."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, options={self.options!r})"


class _FunctionMethod(Method):
    """A method registered as a plain function ``fn(ctx)``, with the options it declares."""

    supports_target = True

    def __init__(self, fn: Callable[[CraftContext], None], options_type: type[Options], name: str,
                 options: Mapping[str, Any] | Options | None) -> None:
        self.fn, self.Options = fn, options_type
        super().__init__(options, name=name)

    def run_pass(self, ctx: CraftContext) -> None:
        self.fn(ctx)


_METHODS: dict[str, type[Method] | Callable] = {}
_PREFIX_METHODS: dict[str, type[Method] | Callable] = {}
_FUNCTION_OPTIONS: dict[int, type[Options]] = {}


def register_method(name: str | None = None, *, prefix: bool = False,
                    options: type[Options] = NoOptions) -> Callable:
    """Register a :class:`Method` subclass (as its ``name``, or ``name`` if given) or a function
    ``fn(ctx) -> None`` (under ``name``, taking the option dataclass ``options``).

    Usable as ``@register_method()`` / ``@register_method("name")`` on a class or a function.
    With ``prefix=True`` the method answers every ``"name:ARG"``; it is built with the full name.
    """

    def decorate(obj):
        key = name or getattr(obj, "name", "")
        if not key:
            raise ValueError("register_method needs a name (or a Method class with one)")
        if not (isinstance(obj, type) and issubclass(obj, Method)):
            if not callable(obj):
                raise ValueError(f"register_method takes a Method subclass or a function, got {obj!r}")
            _FUNCTION_OPTIONS[id(obj)] = options
        (_PREFIX_METHODS if prefix else _METHODS)[key] = obj
        return obj

    return decorate


def get_method(name: str) -> type[Method] | Callable:
    """The class (or function) registered for ``name``; ``ValueError`` listing the known ones."""
    if name in _METHODS:
        return _METHODS[name]
    head, sep, _ = name.partition(":")
    if sep and head in _PREFIX_METHODS:
        return _PREFIX_METHODS[head]
    raise ValueError(f"unknown method {name!r}: choose one of {', '.join(available_methods())}")


def make_method(method: str | Method, options: Mapping[str, Any] | None = None) -> Method:
    """A ready :class:`Method`: ``method`` itself if it is one (then ``options`` must be empty),
    else the registered method of that name built with ``options`` (validated)."""
    if isinstance(method, Method):
        if options:
            raise ValueError("give the options to the Method object itself, not as method_options")
        return method
    if not isinstance(method, str):
        raise ValueError(f"method must be a name or a Method, got {type(method).__name__}")
    registered = get_method(method)
    if isinstance(registered, type):
        return registered(options, name=method)
    return _FunctionMethod(registered, _FUNCTION_OPTIONS[id(registered)], method, options)


def available_methods() -> list[str]:
    """Registered method names (prefix methods shown as ``name:…``)."""
    return sorted(_METHODS) + [f"{p}:…" for p in sorted(_PREFIX_METHODS)]


@dataclass
class CraftContext:
    """What a method sees during one pass, and the counters it fills in."""

    model: nn.Module
    x: torch.Tensor  # crafting images, on the model's device
    clean: torch.Tensor  # clean predictions k̂(x_i), on the model's device
    v: torch.Tensor  # the current perturbation (C×H×W, on the model's device)
    eps: float
    p: float
    order: torch.Tensor  # indices visited in this pass
    pass_index: int
    method: Method
    generator: torch.Generator  # for methods that need more randomness, seeded per pass
    criterion: Criterion  # what counts as success: untargeted or towards a target (uap.criteria)
    attacked: AttackedModels
    callback: Callback | None = None
    #: ``(model, clean predictions)`` of every model of an ensemble, the first being ``model``,
    #: ``clean``; empty for one model (see :meth:`members`)
    ensemble: tuple[tuple[nn.Module, torch.Tensor], ...] = ()
    #: images the batch-norm-folded copies are checked on when there are no crafting images
    example: torch.Tensor | None = None
    #: the images a pass visits, for progress reports, when it visits others than ``order`` (e.g. prior samples)
    total: int | None = None
    visited: int = 0
    fooled_seen: int = 0  # visited images already fooled when visited (live estimate)
    updates: int = 0
    counters: dict[str, int] = field(init=False)  # the method's own (its declared counters), zero at the start
    _last_emit: float = field(default=0.0, repr=False)
    _layout: BatchLayout | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.counters = {name: 0 for name in self.method.counters}

    @property
    def options(self) -> Options:
        """The method's options."""
        return self.method.options

    @property
    def target(self) -> int | None:
        """The target class of a targeted run (None: untargeted); ``criterion`` says what it means."""
        return self.criterion.target

    def members(self) -> list[CraftContext]:
        """One context per attacked model (``[self]`` for one model): the same pass, images, ``v``
        and counters' owner, with that model and its clean predictions. An ensemble's objective
        is the mean of its members' objectives."""
        if len(self.ensemble) <= 1:
            return [self]
        return [self if i == 0 else dataclasses.replace(self, model=m, clean=c, callback=None, _layout=None)
                for i, (m, c) in enumerate(self.ensemble)]

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the method's counter ``name`` (one of its ``counters``)."""
        if name not in self.counters:
            raise ValueError(f"method {self.method.name!r} counts {name!r} but declares only the counters "
                             f"{list(self.counters)}; add it to the method's counters")
        self.counters[name] += int(n)

    @property
    def classifier(self) -> nn.Module:
        """The model as methods attack it: its batch-norm-folded copy (:mod:`uap.fold`), unless
        the run was asked not to fold. Fooling rates are always measured on ``model`` itself."""
        return self.attacked(self.model, self.x if self.x.shape[0] or self.example is None else self.example)

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """``P_{p,ε}(v)``."""
        return project_lp(v, self.eps, self.p)

    def perturbed(self, idx: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        """``clip(x[idx] + v, 0, 1)`` (at the current ``v`` unless another is given)."""
        return (self.x[idx] + (self.v if v is None else v)).clamp_(0.0, 1.0)

    def logits(self, idx: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        """The classifier's logits at ``clip(x[idx] + v, 0, 1)``, in one gradient-free pass."""
        if self._layout is None:
            self._layout = BatchLayout(self.x.device, self.classifier)
        return self._layout.logits(self.classifier, self.perturbed(idx, v))[1]

    def is_fooled(self, idx: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """``k̂(x_i + v) ≠ k̂(x_i)`` for each index (from ``logits`` at ``x[idx] + v`` if given)."""
        z = self.logits(idx) if logits is None else logits
        return z.argmax(dim=1) != self.clean[idx]

    def progress(self, force: bool = False) -> None:
        """Report live progress to the callback (at most ~10 times a second)."""
        now = time.perf_counter()
        if self.callback is None or (not force and now - self._last_emit < 0.1):
            return
        self._last_emit = now
        self.callback({
            "event": "progress", "pass": self.pass_index, "visited": self.visited,
            "total": int(self.order.numel()) if self.total is None else self.total, "fooled_seen": self.fooled_seen,
            **self.counters, "updates": self.updates,
        })


class AttackedModels:
    """The modules a crafting run attacks, each folded once (:func:`uap.fold.fold_batchnorm`)
    on first use and kept for the whole run, or used as they are when ``fold`` is False."""

    def __init__(self, fold: bool) -> None:
        if not isinstance(fold, bool):
            raise ValueError(f"fold_batchnorm must be true or false, got {fold!r}")
        self.fold = fold
        self._copies: dict[int, tuple[nn.Module, nn.Module]] = {}

    def __call__(self, module: nn.Module, example: torch.Tensor) -> nn.Module:
        """``module`` as attacked: folded (checked on ``example[:8]``) or as it is."""
        if id(module) not in self._copies:
            foldable = self.fold and isinstance(module, nn.Module)
            attacked = fold_batchnorm(module, example[:8]) if foldable else module
            self._copies[id(module)] = (module, attacked)
        return self._copies[id(module)][1]

    def folded_layers(self) -> int | None:
        """BatchNorm layers the run attacked folded (None if it attacked no module)."""
        if not self._copies:
            return None
        return sum(count_batchnorm(m) - count_batchnorm(a) for m, a in self._copies.values() if isinstance(m, nn.Module))
