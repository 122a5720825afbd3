"""What a baseline is, where baselines are registered, and how rows are built from names.

A baseline is one class deriving from :class:`Baseline`:

- ``name`` — what ``--baselines`` / ``baselines=`` calls it (the registry key);
- ``variants`` — the names it answers when it is a family (``chessboard1``, ``chessboard1n`` …);
  its ``name`` then selects the whole family. Empty for a single baseline (its name is its one
  variant);
- ``needs`` — what it needs besides the shape and the budget: ``"models"`` (it is made per
  model: one row ``<variant>:<model>`` each, with ``ctx.model`` set) and/or ``"x_craft"``
  (crafting images, ``ctx.x_craft``). A baseline that needs nothing is *data-free*: it is in the
  default set of ``uap evaluate`` and in :func:`strongest_baseline`;
- ``Options`` — a frozen :class:`uap.options.Options` dataclass of its knobs (those of a
  baseline that needs models come from ``build_baselines(search=…)``);
- ``make(variant, ctx)`` — the perturbation, C×H×W, within the budget (``ctx.scaled(r)`` rescales
  a pattern to ``‖r‖p = ε``), or a :class:`Row` with facts recorded beside it.

:func:`register_baseline` adds a class to the registry; :func:`parse_baselines` reads names and
groups (a family's name, ``data-free``, ``all``, ``none``) in registration order, and
:func:`build_baselines` makes the rows. No caller tests a baseline's name: it asks the class
(:func:`needs_of`, :func:`row_names`) or a built row's facts (``Baselines.info[row]["model"]``).
This module imports no baseline, so baselines import it and never the reverse.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence, TypeVar

import torch
from torch import nn

from uap.forward import DEFAULT_BATCH_SIZE, check_images
from uap.options import Options
from uap.projection import check_norm, norm_name

__all__ = [
    "Baseline",
    "BaselineContext",
    "Row",
    "Baselines",
    "NEEDS",
    "register_baseline",
    "unregister_baseline",
    "get_baseline",
    "available_baselines",
    "data_free_baselines",
    "parse_baselines",
    "needs_of",
    "row_names",
    "build_baselines",
    "strongest_baseline",
]

#: What a baseline may need besides the image shape and the budget, and how errors name it.
NEEDS = {"models": "models to search on", "x_craft": "crafting images (x_craft)"}

#: Names that select several baselines; no baseline may take them.
_SPECIAL_GROUPS = ("all", "none", "data-free")

_NAME = re.compile(r"[a-z0-9][a-z0-9_.+-]*")

#: ``callback(event, info)``: ``"baseline"`` before each per-model row is made (info:
#: baseline, model).
EventFn = Callable[[str, dict], None]


# ---------------------------------------------------------------------------- checks

def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"shape must be non-empty with positive sizes, got {shape}")
    return shape


def _check_image_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = _check_shape(shape)
    if len(shape) != 3:
        raise ValueError(f"shape must be one image's C×H×W, got {shape}")
    return shape  # type: ignore[return-value]


def _check_budget(eps: float, p: float | int | str) -> tuple[float, float]:
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    try:
        return float(eps), check_norm(p)
    except ValueError:
        raise ValueError(f"p must be inf, 2 or 1, got {p!r}") from None


def _to_norm(r: torch.Tensor, eps: float, p: float, dtype: torch.dtype) -> torch.Tensor:
    """``r`` (float64, non-zero) rescaled to ``‖r‖p = eps``."""
    return (r * (eps / torch.linalg.vector_norm(r.flatten(), ord=p))).to(dtype)


# ---------------------------------------------------------------------------- the plug-in

@dataclass(frozen=True)
class NoOptions(Options):
    """The options of a baseline that has none."""


@dataclass(frozen=True)
class BaselineContext:
    """What a baseline sees when it makes a row.

    Attributes:
        shape: one image's C×H×W.
        eps, p: the budget: every row has ``‖v‖p ≤ eps`` (the built-in ones ``= eps``).
        seed: seeds any randomness (use a private ``torch.Generator``: the global RNG is left alone).
        models: ``{name: target}``, for baselines that need models.
        x_craft: crafting images (never held-out ones), for baselines that need them.
        batch_size: images per forward pass.
        model, model_name: the model this row is made for (baselines that need models), else None.
    """

    shape: tuple[int, int, int]
    eps: float
    p: float
    seed: int = 0
    models: Mapping[str, nn.Module] | None = None
    x_craft: torch.Tensor | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    model: nn.Module | None = None
    model_name: str | None = None

    def scaled(self, r: torch.Tensor) -> torch.Tensor:
        """``r`` (any non-zero pattern) rescaled to ``‖r‖p = eps``: computed in float64, returned in float32."""
        return _to_norm(r.to(torch.float64), self.eps, self.p, torch.float32)


@dataclass
class Row:
    """A baseline row: the perturbation ``v`` and facts recorded beside it in ``Baselines.info``."""

    v: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


class Baseline:
    """Base class of baselines (see the module docstring)."""

    name: ClassVar[str] = ""
    variants: ClassVar[tuple[str, ...]] = ()
    needs: ClassVar[frozenset[str]] = frozenset()
    Options: ClassVar[type[Options]] = NoOptions

    def __init__(self, options: Mapping[str, Any] | Options | None = None, *, name: str | None = None) -> None:
        self.name = name or type(self).name
        self.options = self.Options.parse(options, owner=f"baseline {self.name!r}")

    def make(self, variant: str, ctx: BaselineContext) -> torch.Tensor | Row:
        """The perturbation ``variant`` (one of this baseline's names) for ``ctx``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, options={self.options!r})"


B = TypeVar("B", bound=type)
_BASELINES: dict[str, type[Baseline]] = {}


def _variants(key: str, cls: type[Baseline]) -> tuple[str, ...]:
    return tuple(cls.variants) or (key,)


def register_baseline(name: str | None = None) -> Callable[[B], B]:
    """Register a :class:`Baseline` subclass under ``name`` (default: its ``name``); used as
    ``@register_baseline()``. Its variants join :func:`parse_baselines` after those registered
    before it. A name a baseline (or a group) already has is a ``ValueError``: a baseline is
    replaced only by unregistering it first (:func:`unregister_baseline`)."""

    def decorate(cls: B) -> B:
        if not (isinstance(cls, type) and issubclass(cls, Baseline)):
            raise ValueError(f"register_baseline takes a Baseline subclass, got {cls!r}")
        key = name or cls.name
        if not key:
            raise ValueError("register_baseline needs a name (or a Baseline class with one)")
        names = (key, *_variants(key, cls))
        bad = [n for n in names if not isinstance(n, str) or not _NAME.fullmatch(n)]
        if bad:
            raise ValueError(f"baseline names must be lower-case words (letters, digits, _ . + -), got {bad}")
        unknown = sorted(set(cls.needs) - set(NEEDS))
        if unknown:
            raise ValueError(f"baseline {key!r} needs {unknown}: a baseline may need {', '.join(NEEDS)}")
        taken = set(_SPECIAL_GROUPS).union(*((k, *_variants(k, c)) for k, c in _BASELINES.items()))
        clash = sorted(set(names) & taken)
        if clash:
            raise ValueError(f"baseline name(s) {clash} are taken; choose another name (or unregister_baseline first)")
        _BASELINES[key] = cls
        return cls

    return decorate


def unregister_baseline(name: str) -> type[Baseline]:
    """Remove the baseline registered as ``name`` (its whole family) and return its class."""
    if name not in _BASELINES:
        raise ValueError(f"no baseline is registered as {name!r}")
    return _BASELINES.pop(name)


def _owners() -> dict[str, tuple[str, type[Baseline]]]:
    """``{variant: (registry key, class)}`` in registration order."""
    return {v: (k, c) for k, c in _BASELINES.items() for v in _variants(k, c)}


def get_baseline(name: str) -> type[Baseline]:
    """The class registered for the baseline (or family) ``name``."""
    if name in _BASELINES:
        return _BASELINES[name]
    owner = _owners().get(name)
    if owner is None:
        raise ValueError(f"unknown baseline {name!r}: use {', '.join(_known_names())}")
    return owner[1]


def available_baselines() -> tuple[str, ...]:
    """Every baseline name (variants of a family one by one), in the order rows are shown."""
    return tuple(_owners())


def data_free_baselines() -> tuple[str, ...]:
    """The baselines that need no data and no model, in row order (what a crafted UAP is
    read against, and the default of ``uap evaluate``)."""
    return tuple(v for v, (_, c) in _owners().items() if not c.needs)


def _groups() -> dict[str, tuple[str, ...]]:
    families = {k: _variants(k, c) for k, c in _BASELINES.items() if _variants(k, c) != (k,)}
    return {**families, "all": available_baselines(), "none": (), "data-free": data_free_baselines()}


def _known_names() -> tuple[str, ...]:
    return (*available_baselines(), *_groups())


def parse_baselines(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """Baseline names from ``"random,chessboard,fourier"`` (or a sequence of names), in
    registration order, without repeats. A family's name (``chessboard``: every cell size in
    both signs) means all its variants, ``data-free`` every baseline that needs no data,
    ``all`` every baseline, ``none`` (or an empty string) none."""
    if spec is None:
        return ()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    if not all(isinstance(item, str) for item in items):
        raise ValueError(f"baselines are names: a comma-separated string or a sequence of strings, got {spec!r}")
    items = [item.strip().lower() for item in items]
    known, groups = available_baselines(), _groups()
    chosen: set[str] = set()
    for item in items:
        if not item:
            continue
        if item in groups:
            chosen.update(groups[item])
        elif item in known:
            chosen.add(item)
        else:
            raise ValueError(f"unknown baseline {item!r}: use {', '.join(_known_names())}")
    return tuple(b for b in known if b in chosen)


def needs_of(names: str | Sequence[str] | None) -> frozenset[str]:
    """What the chosen baselines need together (a subset of :data:`NEEDS`), e.g. to load
    crafting images only when some baseline searches on them."""
    return frozenset().union(*(get_baseline(b).needs for b in parse_baselines(names)))


def _model_row(variant: str, model: str) -> str:
    return f"{variant}:{model}"


def row_names(names: str | Sequence[str] | None, models: Sequence[str] = ()) -> list[str]:
    """The rows :func:`build_baselines` gives for ``names`` and the model names ``models``,
    in order, without building anything (to check them against other names first)."""
    rows: list[str] = []
    for variant in parse_baselines(names):
        per_model = "models" in get_baseline(variant).needs
        rows += [_model_row(variant, str(m)) for m in models] if per_model else [variant]
    return rows


# ---------------------------------------------------------------------------- building rows

@dataclass
class Baselines:
    """Baseline rows: ``perturbations`` ``{row name: v}`` and ``info`` ``{row name: facts}``
    (kind, and for a per-model row the model it was made for, budget, seed and what the
    baseline recorded), with the budget ``eps``, ``p`` they were built at and ``n_craft``, the
    crafting images they used (0 when none needed any)."""

    perturbations: dict[str, torch.Tensor]
    info: dict[str, dict[str, Any]]
    eps: float | None = None
    p: float | None = None
    n_craft: int = 0

    def meta(self) -> dict[str, Any]:
        """The report metadata of these rows: ``baseline_norm``, ``baseline_p``, ``baselines``
        (the info) and ``n_craft``; empty when there are no rows."""
        if not self.perturbations:
            return {}
        return {"baseline_norm": self.eps, "baseline_p": norm_name(self.p), "baselines": self.info,
                "n_craft": self.n_craft}


def _check_needs(variant: str, needs: frozenset[str], shape: tuple[int, ...],
                 models: Mapping[str, nn.Module] | None, x_craft: torch.Tensor | None) -> None:
    missing = [NEEDS[n] for n in NEEDS if n in needs and not (models if n == "models" else x_craft is not None)]
    if missing:
        raise ValueError(f"the {variant} baseline needs {' and '.join(missing)}")
    if "x_craft" in needs:
        check_images(x_craft, "x_craft")
        if tuple(x_craft.shape[1:]) != shape:
            raise ValueError(f"x_craft images are {tuple(x_craft.shape[1:])}, the baselines are for {shape}")


def _checked_row(variant: str, row: torch.Tensor | Row, ctx: BaselineContext) -> Row:
    row = row if isinstance(row, Row) else Row(row)
    v = row.v
    if not isinstance(v, torch.Tensor) or not v.is_floating_point() or tuple(v.shape) != ctx.shape:
        raise ValueError(f"baseline {variant!r} must give a float tensor of shape {ctx.shape}, "
                         f"got {getattr(v, 'dtype', type(v).__name__)} {tuple(getattr(v, 'shape', ()))}")
    size = float(torch.linalg.vector_norm(v.detach().flatten().double(), ord=ctx.p))
    if not size <= ctx.eps * (1 + 1e-5):
        raise ValueError(f"baseline {variant!r} has ℓ{norm_name(ctx.p)} norm {size:.6g}, over the budget "
                         f"{ctx.eps:.6g} (ctx.scaled(r) puts a pattern at the budget)")
    return Row(v.detach().to(device="cpu", dtype=torch.float32), row.info)


def build_baselines(
    names: str | Sequence[str] | None,
    shape: Sequence[int],
    eps: float,
    p: float | int | str = math.inf,
    *,
    seed: int = 0,
    models: Mapping[str, nn.Module] | None = None,
    x_craft: torch.Tensor | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    search: Mapping[str, Any] | None = None,
    callback: EventFn | None = None,
) -> Baselines:
    """The baseline perturbations ``names`` for images of ``shape``, each with ``‖v‖p = eps``.

    A baseline that needs models gives one row per model in ``models``, ``<name>:<model>``
    (``fourier:<model>``: the best single Fourier basis image for that model, searched on
    ``x_craft`` — the crafting images, never the held-out ones). ``search`` holds the options
    of the baselines that need models (for ``fourier``: ``start_images``, ``eta``,
    ``finalists``, ``max_frequency``); ``callback("baseline", {"baseline", "model"})`` is
    called before each per-model row is made.
    """
    chosen = parse_baselines(names)
    shape = _check_image_shape(shape)
    eps, p = _check_budget(eps, p)
    ctx = BaselineContext(shape=shape, eps=eps, p=p, seed=seed, models=models, x_craft=x_craft, batch_size=batch_size)
    owners = _owners()
    for variant in chosen:  # every missing input is told before any row is made
        _check_needs(variant, owners[variant][1].needs, shape, models, x_craft)
    instances: dict[str, Baseline] = {}
    perts: dict[str, torch.Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    for variant in chosen:
        key, cls = owners[variant]
        if key not in instances:
            instances[key] = cls(search if "models" in cls.needs else None, name=key)
        baseline = instances[key]
        made: list[tuple[str, str | None, BaselineContext]] = [(variant, None, ctx)]
        if "models" in cls.needs:
            made = [(_model_row(variant, m), m, dataclasses.replace(ctx, model=model, model_name=m))
                    for m, model in models.items()]
        for row_name, model_name, row_ctx in made:
            if model_name is not None and callback is not None:
                callback("baseline", {"baseline": variant, "model": model_name})
            row = _checked_row(variant, baseline.make(variant, row_ctx), row_ctx)
            perts[row_name] = row.v
            info[row_name] = {"kind": variant, **({"model": model_name} if model_name is not None else {}),
                              "eps": eps, "norm": norm_name(p), "seed": seed, **row.info}
    used_craft = any("x_craft" in owners[v][1].needs for v in chosen)
    return Baselines(perturbations=perts, info=info, eps=eps, p=p, n_craft=len(x_craft) if used_craft else 0)


def strongest_baseline(
    model: nn.Module,
    x: torch.Tensor,
    eps: float,
    p: float | int | str = math.inf,
    *,
    y: torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, Any]:
    """The data-free baseline (random, Gaussian, chessboards …) that fools ``model`` most on ``x``
    at ``‖v‖p = eps``: ``{"name", "fooling_rate", "accuracy" (None without y), "rates"}``, with
    ``rates`` the fooling rate of every one of them. What a crafted UAP should be read against."""
    from uap.metrics import accuracy, fooling_rate

    check_images(x)
    built = build_baselines(data_free_baselines(), x.shape[1:], eps, p, seed=seed)
    rates = {name: fooling_rate(model, x, v, batch_size=batch_size) for name, v in built.perturbations.items()}
    name = max(rates, key=rates.get)
    acc = None if y is None else accuracy(model, x, y, built.perturbations[name], batch_size=batch_size)
    return {"name": name, "fooling_rate": rates[name], "accuracy": acc, "rates": rates}
