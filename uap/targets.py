"""Resolve a model spec into a classifier the engine can attack.

A *target* is an ``nn.Module`` taking images in ``[0, 1]`` (N×3×H×W) and returning logits
(N×C); normalisation lives inside it. :func:`resolve_model` accepts three spellings:

- ``package.module:factory`` — a user's own model: the module is imported (its top-level code
  runs) and ``factory()`` is called to build the module, so name only code you trust; an
  attribute that is not callable, or that needs arguments, is refused without being called; weights
  come from ``weights`` (safetensors, or a state dict read with
  ``torch.load(..., weights_only=True)``, which cannot run code);
- ``SOURCE:NAME`` — model ``NAME`` of the *model source* ``SOURCE`` (e.g. ``zoo:supervised``,
  or the adapters of :mod:`uap.adapters`: ``torchvision:resnet18``, ``timm:vit_tiny_patch16_224``);
  a source that declares :attr:`ModelSource.weights` also takes a ``weights`` file;
- a bare name or a path (``supervised``, ``supervised@knn``, ``runs/x/NAME.safetensors``) —
  asked of every source that answers bare specs (:attr:`ModelSource.bare`), in order.

Every spelling takes the normalisation its model expects as a query, ``SPEC?mean=a/b/c&std=a/b/c``
(values on the [0, 1] scale, one per channel or one for all): the model is then wrapped in
:class:`Normalized`, or, when it is one already (an adapter's model), its normalisation is
replaced. ``resolve_model``'s ``mean``/``std`` arguments say the same. A source may read
further query options itself (:attr:`ModelSource.options`, e.g. ``hub:DIR:ENTRY?size=224``);
:func:`split_query` is the one parser of that query.

Model sources are how the engine finds models without importing the packages that define
them: ``uap`` never imports the repo's ``models`` package (``models`` imports ``uap``). A
source is a :class:`ModelSource` in one registry, :func:`register_model_source`. Installed
packages feed it through the entry-point group ``"uap.models"`` (the entry point's name is the
source's name; the object is loaded only when a spec needs it)::

    [project.entry-points."uap.models"]
    zoo = "models.zoo:MODEL_SOURCE"
    torchvision = "uap.adapters.torchvision:SOURCE"

That table in ``pyproject.toml`` is the one declaration of the sources this project ships
(the zoo and :mod:`uap.adapters`). An installed ``uap`` reads it from its metadata; ``uap`` run
from a source checkout (on ``PYTHONPATH``, not installed, or installed from an older tree) also
reads the checkout's own ``pyproject.toml``, so what the checkout declares is what it has.
A source name has no dots, so ``package.module:factory`` is never taken for one; a source named
like a top-level module does take over ``thatmodule:…`` specs.

Front ends work on lists of specs with :func:`parse_model_list` (``"a,b,c"`` or ``"all"``),
:func:`split_weights` (``SPEC=WEIGHTS_FILE``), :func:`load_models` (specs → ``{label: model}``)
and :func:`short_name` (the label: each source spells it through :attr:`ModelSource.label`).

Errors are :class:`ModelSpecError` (a ``ValueError``) whose ``arguments`` name the parameters
of :func:`resolve_model` at fault, so a front end can point at its own option names.
"""
from __future__ import annotations

import difflib
import importlib
import itertools
import math
import warnings
import inspect
import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence
from urllib.parse import parse_qsl

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from uap.checkpoints import NESTED_KEYS, describe_mismatch, fit_state_dict, unnest_state_dict

__all__ = [
    "ENTRY_POINT_GROUP", "ModelSource", "ModelSpecError", "UnknownModelError", "Normalized",
    "register_model_source", "model_sources", "source_names", "available_models", "resolve_model",
    "load_state_dict_file", "load_weights", "split_weights", "short_name", "parse_model_list", "load_models",
    "split_query", "spec_normalisation", "split_normalisation", "with_normalisation", "NORMALISATION_OPTIONS",
]

#: Entry-point group in which installed packages publish their :class:`ModelSource`.
ENTRY_POINT_GROUP = "uap.models"

_SOURCE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_LISTED = 12  # names per source shown in an "unknown model" message
#: The query options :func:`resolve_model` reads for every source: the normalisation the model expects.
NORMALISATION_OPTIONS = ("mean", "std")


class ModelSpecError(ValueError):
    """A model spec, or an argument that goes with it, cannot be used.

    ``arguments`` names the parameters of :func:`resolve_model` the message is about
    (``"spec"``, ``"weights"``, ``"mean"``, ``"std"``).
    """

    def __init__(self, message: str, *arguments: str) -> None:
        super().__init__(message)
        self.arguments: tuple[str, ...] = arguments or ("spec",)


class UnknownModelError(ModelSpecError):
    """No model source has the named model; the message lists what they have."""


@dataclass(frozen=True)
class ModelSource:
    """Where named models come from (the repo's zoo, a torchvision or timm adapter …).

    Attributes:
        load: ``load(name) -> nn.Module`` — the classifier (images in [0, 1] → logits), or
            ``None`` when the source has no model of that name. For ``SOURCE:NAME`` it gets
            ``NAME``; for a bare spec, the whole spec. When ``weights`` is set it is called as
            ``load(name, weights=PATH_OR_NONE)``.
        names: ``names() -> list of str`` — the models it can load, for listings and error
            messages (may be empty for an adapter over an open-ended hub).
        bare: also ask this source about specs without a ``SOURCE:`` prefix.
        help: one line on how its names are spelled, shown in error messages.
        weights: the source builds architectures and takes a weights file for them (an
            adapter over a model library); a weights file given to a source without it is an error.
        library: the Python package the source needs (for listings: installed or not); empty
            for a source that needs nothing beyond ``uap``'s own dependencies.
        label: ``label(name) -> str`` — the short name of its model ``NAME`` (a table's column
            for ``SOURCE:NAME``, :func:`short_name`); by default the part after the last ``:``.
        options: the query options (``NAME?key=value&…``) the source reads itself; ``load``
            then gets the query with its name. ``mean``/``std`` among them are the source's own
            (given as arguments of :func:`resolve_model`, they are added to its query);
            otherwise :func:`resolve_model` reads them and any other option is refused.
        ready: ``ready() -> list of str`` — the models whose weights are installed on this
            machine, so that they load without a weights file (for listings); none by default.
    """

    load: Callable[..., nn.Module | None]
    names: Callable[[], Sequence[str]] = tuple
    bare: bool = False
    help: str = ""
    weights: bool = False
    library: str = ""
    label: Callable[[str], str] = lambda name: _last_part(name)
    options: tuple[str, ...] = ()
    ready: Callable[[], Sequence[str]] = tuple


def _last_part(name: str) -> str:
    """The default :attr:`ModelSource.label`: ``NAME`` after its last ``:`` (``a:b`` → ``b``)."""
    return name.rsplit(":", 1)[-1]


def _checkout_entry_points() -> list[importlib.metadata.EntryPoint]:
    """The group's entry points declared by the ``pyproject.toml`` of the source checkout this
    ``uap`` runs from; none for an installed copy (no ``pyproject.toml`` beside the package),
    another project's file, or a Python without :mod:`tomllib`."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        import tomllib

        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
    except (ImportError, OSError, ValueError):
        return []
    if project.get("name") != "uap":
        return []
    declared = project.get("entry-points", {}).get(ENTRY_POINT_GROUP, {})
    return [importlib.metadata.EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in declared.items()]


def _installed_entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    """The checkout's declarations (:func:`_checkout_entry_points`), then those of every installed
    package that it does not declare itself."""
    declared = _checkout_entry_points()
    names = {ep.name for ep in declared}
    return declared + [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name not in names]


class _Registry:
    """Model sources by name: installed entry points (each loaded on first use), then registrations."""

    def __init__(self, discover: Callable[[], Iterable[importlib.metadata.EntryPoint]] = _installed_entry_points):
        self._discover = discover
        self._sources: dict[str, ModelSource] = {}
        self._entry_points: dict[str, importlib.metadata.EntryPoint] | None = None

    def entry_points(self) -> dict[str, importlib.metadata.EntryPoint]:
        if self._entry_points is None:  # read once: metadata only, nothing is imported
            self._entry_points = {ep.name: ep for ep in self._discover()}
        return self._entry_points

    def register(self, name: str, source: ModelSource, replace: bool) -> None:
        if not isinstance(name, str) or not _SOURCE_NAME.fullmatch(name):
            raise ValueError(f"a model source name is a letter then letters, digits, '_' or '-', got {name!r}")
        if not isinstance(source, ModelSource):
            raise TypeError(f"model source {name!r} must be a ModelSource, got {type(source).__name__}")
        if not replace and name in self.names():
            raise ValueError(f"a model source named {name!r} is already registered (pass replace=True)")
        self._sources[name] = source

    def names(self) -> list[str]:
        return list(self.entry_points()) + [n for n in self._sources if n not in self.entry_points()]

    def get(self, name: str) -> ModelSource | None:
        if name in self._sources:
            return self._sources[name]
        ep = self.entry_points().get(name)
        if ep is None:
            return None
        source = ep.load()
        if not isinstance(source, ModelSource):
            raise TypeError(f"entry point {name} = {ep.value!r} in group {ENTRY_POINT_GROUP!r} "
                            f"gives a {type(source).__name__}, not a uap.targets.ModelSource")
        self._sources[name] = source
        return source


_REGISTRY = _Registry()


def register_model_source(name: str, source: ModelSource, *, replace: bool = False) -> None:
    """Make ``name:NAME`` specs (and, with ``source.bare``, bare names) resolve through ``source``.

    A registration takes precedence over an installed entry point of the same name when
    ``replace`` is set; without it, a taken name is a ``ValueError``.
    """
    _REGISTRY.register(name, source, replace)


def model_sources() -> dict[str, ModelSource]:
    """Every known model source by name, in resolution order (imports the entry points' modules)."""
    return {name: source for name in _REGISTRY.names() if (source := _REGISTRY.get(name)) is not None}


def source_names() -> list[str]:
    """The names of every known model source, in resolution order, without importing any of them."""
    return _REGISTRY.names()


def available_models() -> dict[str, list[str]]:
    """``{source name: the models it lists}`` for every model source."""
    return {name: list(source.names()) for name, source in model_sources().items()}


class Normalized(nn.Module):
    """``model((x - mean) / std)``: lets a model that expects normalised input take [0, 1]."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.zeros(1, 1, 1, 1))
        self.register_buffer("std", torch.ones(1, 1, 1, 1))
        self.set_normalisation(mean, std)

    def set_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Use ``mean``/``std`` (checked by :meth:`check`) from now on; values above 1 — typed on
        the 0–255 scale, where images here are in [0, 1] — are kept, with a warning."""
        self.check(mean, std)
        if max(abs(float(v)) for v in [*mean, *std]) > 1:
            warnings.warn(f"mean {list(mean)} / std {list(std)} has values above 1, but images are on the [0, 1] "
                          "scale (divide values given for 0-255 pixels by 255)", UserWarning, stacklevel=3)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.mean.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.std.device).view(1, -1, 1, 1)
        if isinstance(getattr(self, "preprocessing", None), dict):  # an adapter's record of its weights' preprocessing
            self.preprocessing = {**self.preprocessing, "mean": [float(m) for m in mean], "std": [float(v) for v in std]}

    @staticmethod
    def check(mean: Sequence[float], std: Sequence[float], channels: int | None = None) -> None:
        """Validate a normalisation: as many finite means as stds, every std finite and > 0, and,
        given the images' ``channels``, one value per channel (or a single value for all).
        Errors are :class:`ModelSpecError` about ``mean``/``std``."""
        try:
            mean, std = [float(m) for m in mean], [float(s) for s in std]
        except (TypeError, ValueError):
            raise ModelSpecError(f"mean and std must be sequences of numbers, got {mean!r} and {std!r}",
                                 "mean", "std") from None
        if not mean or not std:
            raise ModelSpecError("mean and std need at least one value each", "mean", "std")
        if len(mean) != len(std):
            raise ModelSpecError(f"mean has {len(mean)} values but std has {len(std)}", "mean", "std")
        if any(not math.isfinite(m) for m in mean):
            raise ModelSpecError(f"mean values must be finite numbers, got {mean}", "mean")
        if any(not (math.isfinite(s) and s > 0) for s in std):
            raise ModelSpecError(f"std values must be finite and > 0, got {std}", "std")
        if channels is not None and len(mean) not in (1, channels):
            raise ModelSpecError(f"mean and std have {len(mean)} values but the images have {channels} channels "
                                 "(give one value per channel, or one for all)", "mean", "std")

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std``: the normalisation the wrapped model expects, of images in [0, 1].
        (The channel check is skipped while ``torch.fx`` traces the model — a traced input is
        no tensor — so that batch-norm folding sees through this wrapper.)"""
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and self.mean.shape[1] not in (1, x.shape[1]):
            self.check(self.mean.flatten().tolist(), self.std.flatten().tolist(), channels=x.shape[1])
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights without unpickling arbitrary objects (safetensors or ``weights_only``); of a
    training checkpoint, the state dict nested in it (:func:`uap.checkpoints.unnest_state_dict`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # SafetensorError (not an OSError): random bytes, a truncated or foreign file
            raise ValueError(f"could not read {path} as safetensors (damaged, truncated or not safetensors): "
                             f"{' '.join(str(e).split())}") from None
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: the outcome says all
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refusing a global, a corrupt file …
        reason = " ".join(str(e).split())
        raise ValueError(f"could not read {path} as a state dict (weights_only): {reason}") from None
    state = unnest_state_dict(checkpoint)
    if state is None:
        keys = ", ".join(map(str, list(checkpoint)[:8])) if isinstance(checkpoint, dict) else ""
        raise ValueError(f"{path} does not hold a state dict" + (
            f" (its keys: {keys}: the tensors are neither at its top level nor under one of "
            f"{', '.join(NESTED_KEYS)}, nor in its only dict of tensors)" if keys
            else f" (it holds a {type(checkpoint).__name__})"))
    return state


def load_weights(model: nn.Module, weights: str | Path, spec: str,
                 adapt: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> nn.Module:
    """Load the state dict in ``weights`` into ``model`` (built for ``spec``), strictly;
    ``adapt`` may rename or reshape the file's tensors first (a source's own checkpoint layout).

    The file may be a checkpoint as people save them (:mod:`uap.checkpoints`): the state dict
    nested under ``state_dict``, ``model``, ``ema`` …, keys prefixed by ``module.`` or
    ``_orig_mod.``, or another project's names for the same tensors in the same order. A
    missing file is a ``FileNotFoundError``; an unreadable one, or weights of another
    architecture, is a :class:`ModelSpecError` about ``weights`` naming the file, the spec, the
    first missing and unexpected tensors with their shapes, and the likely cause, in one line.
    """
    try:
        state = load_state_dict_file(weights)
    except ValueError as e:
        raise ModelSpecError(f"{e} (weights for {spec})", "weights") from None
    if adapt is not None:
        state = adapt(state)
    expected = model.state_dict()
    state = fit_state_dict(state, expected)
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise ModelSpecError(f"weights in {weights} do not fit {spec} {describe_mismatch(state, expected)}",
                             "weights") from None
    return model


def resolve_model(
    spec: str,
    weights: str | Path | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[nn.Module, str]:
    """Return ``(model, model_id)`` for a ``module:factory``, ``SOURCE:NAME``, bare name or path,
    each optionally followed by ``?mean=a/b/c&std=a/b/c`` (module docstring).

    ``weights`` goes with ``module:factory`` and with ``SOURCE:NAME`` of a source that takes
    weights (:attr:`ModelSource.weights`, e.g. ``torchvision:resnet18``); the zoo's models
    carry their own. ``mean`` and ``std`` go together, and say what the spec's query would
    (giving both is refused). The model is put in eval mode with gradients of its
    parameters disabled (the engine only needs gradients with respect to the input).
    ``model_id`` is the spec as given.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError("the model spec is empty: give a model name, SOURCE:NAME or package.module:factory")
    if (mean is None) != (std is None):
        raise ModelSpecError("give both mean and std, or neither", "mean", "std")
    given = spec
    spec, mean, std = split_normalisation(spec, mean, std)
    source_name, factory = _kind(spec.partition("?")[0])
    if weights is not None and not factory and (source_name is None or not _REGISTRY.get(source_name).weights):
        takers = [n for n in _REGISTRY.names() if (s := _REGISTRY.get(n)) is not None and s.weights]
        raise ModelSpecError(f"{spec!r} comes with its own weights; a weights file goes with package.module:factory"
                             + (f" or SOURCE:NAME for SOURCE in {', '.join(takers)}" if takers else ""), "weights")
    if factory:
        model = _build_factory(spec)
        if weights is not None:
            load_weights(model, weights, spec)
    else:
        model = _from_sources(spec, source_name, weights)
    if any(is_lazy(t) for t in itertools.chain(model.parameters(), model.buffers())):
        raise ModelSpecError(f"{spec!r} has parameters whose shapes are not set yet (a lazy module, e.g. "
                             "torch.nn.LazyLinear): build it with one forward pass in the factory, or give "
                             "weights that set them", "spec")
    if mean is not None:
        if isinstance(model, Normalized):  # an adapter's model: its normalisation is replaced, not stacked
            model.set_normalisation(mean, std)
        else:
            model = Normalized(model, mean, std)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, given


def split_query(spec: str) -> tuple[str, list[tuple[str, str]]]:
    """``BODY?key=value&…`` → ``(BODY, [(key, value), …])``; a spec without ``?`` → ``(spec, [])``.

    The one parser of a model spec's options (:func:`resolve_model`, the sources that read
    options, :func:`split_weights`). A malformed query, or an option named twice, is a
    :class:`ModelSpecError` about ``spec``."""
    body, sep, query = spec.partition("?")
    if not sep:
        return spec, []
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ModelSpecError(f"{spec!r}: the options after '?' must be key=value pairs joined by '&'") from None
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ModelSpecError(f"{spec!r} gives the option(s) {', '.join(twice)} more than once")
    return body, pairs


def spec_normalisation(spec: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The ``(mean, std)`` a spec's query gives (``SPEC?mean=a/b/c&std=a/b/c``), or None.

    One of the two alone, or values that are not numbers separated by ``/``, is a
    :class:`ModelSpecError` about ``spec``."""
    options = dict(split_query(spec)[1])
    if not any(k in options for k in NORMALISATION_OPTIONS):
        return None
    if not all(k in options for k in NORMALISATION_OPTIONS):
        raise ModelSpecError(f"{spec!r}: give both mean and std in the query (SPEC?mean=a/b/c&std=a/b/c), or neither")
    values = []
    for key in NORMALISATION_OPTIONS:
        try:
            values.append(tuple(float(t) for t in options[key].split("/")))
        except ValueError:
            raise ModelSpecError(f"{spec!r}: option {key} must be numbers separated by /, "
                                 f"got {options[key]!r}") from None
    mean, std = values
    try:
        Normalized.check(mean, std)
    except ModelSpecError as e:  # about the spec's query, not about mean/std arguments
        raise ModelSpecError(f"{spec!r}: {e}") from None
    return mean, std


def with_normalisation(spec: str, mean: Sequence[float], std: Sequence[float]) -> str:
    """``spec`` with the normalisation ``mean``/``std`` in its query (replacing one it has):
    ``pkg.mod:net`` → ``pkg.mod:net?mean=0.485/0.456/0.406&std=0.229/0.224/0.225``."""
    body, _, query = spec.partition("?")
    kept = [part for part in query.split("&") if part and part.partition("=")[0] not in NORMALISATION_OPTIONS]
    norm = [f"{key}={'/'.join(format(float(v), 'g') for v in values)}"
            for key, values in zip(NORMALISATION_OPTIONS, (mean, std))]
    return f"{body}?{'&'.join(kept + norm)}"


def _source_options(body: str) -> tuple[str, ...]:
    """The query options the source of a spec (without its query) reads itself."""
    source_name, factory = _kind(body)
    return () if factory or source_name is None else _REGISTRY.get(source_name).options


def split_normalisation(spec: str, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                        ) -> tuple[str, Sequence[float] | None, Sequence[float] | None]:
    """``(spec for its source, mean, std)``: the normalisation in a spec's query and that given
    as ``mean``/``std`` made one (both at once is a :class:`ModelSpecError`); the returned spec
    keeps only the query options its source reads itself. A source that reads ``mean``/``std``
    itself (``hub:``) keeps them in its spec, and gets the given ones added there.
    ``pkg.mod:net?mean=0.5/0.5/0.5&std=0.2/0.2/0.2`` → ``("pkg.mod:net", (0.5, …), (0.2, …))``."""
    body, pairs = split_query(spec)
    own = _source_options(body)
    unknown = [k for k, _ in pairs if k not in own and k not in NORMALISATION_OPTIONS]
    if unknown:
        readable = sorted(set(own) | set(NORMALISATION_OPTIONS))
        raise ModelSpecError(f"{spec!r}: unknown option(s) {', '.join(unknown)}; a model spec's options are "
                             f"{', '.join(readable)}")
    queried = spec_normalisation(spec)
    if queried is not None and mean is not None:
        raise ModelSpecError(f"{spec!r} gives its normalisation in the query and as mean/std: give it once",
                             "spec", "mean", "std")
    if "mean" in own:  # the source reads its normalisation from the query itself
        return (spec if mean is None else with_normalisation(spec, mean, std)), None, None
    if queried is None:
        return spec, mean, std
    rest = "&".join(part for part in spec.partition("?")[2].split("&")
                    if part.partition("=")[0] not in NORMALISATION_OPTIONS)
    return body + (f"?{rest}" if rest else ""), *queried


def _kind(spec: str) -> tuple[str | None, bool]:
    """``(source name or None, is a module:factory spec)``."""
    head, sep, _ = spec.partition(":")
    if not sep or Path(spec).exists() or spec[1:3] == ":\\":  # a bare name, or a path (Windows drives too)
        return None, False
    if _SOURCE_NAME.fullmatch(head) and head in _REGISTRY.names():
        return head, False
    return None, True


def _from_sources(spec: str, source_name: str | None, weights: str | Path | None = None) -> nn.Module:
    if source_name is not None:
        source = _REGISTRY.get(source_name)
        name = spec.partition(":")[2]
        if not name:
            model = None
        elif source.weights:
            model = source.load(name, weights=None if weights is None else Path(weights))
        else:
            model = source.load(name)
        if model is None:
            names = list(source.names())
            close = difflib.get_close_matches(name.partition(":")[0], names, n=3)
            raise UnknownModelError(f"model source {source_name!r} has no model {name!r}"
                                    + (f" (did you mean {', '.join(close)}?)" if close else "")
                                    + f": {_listing(source_name, source)}")
        return _checked(model, spec)
    bare = {n: s for n, s in model_sources().items() if s.bare}
    for source in bare.values():
        model = source.load(spec)
        if model is not None:
            return _checked(model, spec)
    listing = "; ".join(_listing(n, s) for n, s in bare.items()) or (
        f"no model source is installed (packages publish them under the entry-point group {ENTRY_POINT_GROUP!r})")
    prefixed = ", ".join(_REGISTRY.names())
    raise UnknownModelError(f"unknown model {spec!r}: {listing}"
                            + (f"; or SOURCE:NAME with SOURCE one of {prefixed}" if prefixed else "")
                            + "; or package.module:factory for a model of your own")


def _listing(name: str, source: ModelSource) -> str:
    names = list(source.names())
    shown = ", ".join(names[:_LISTED]) + (f" … ({len(names)} in all)" if len(names) > _LISTED else "")
    text = f"{name} has {shown}" if names else f"{name} lists no models"
    return text + (f" ({source.help})" if source.help else "")


def _checked(model: object, spec: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec} did not give an nn.Module (got {type(model).__name__})")
    return model


def _build_factory(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelSpecError(f"{spec!r} is not package.module:factory (both parts are needed)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelSpecError(f"cannot import {module_name!r} for {spec}: {e}") from None
    except (Exception, SystemExit) as e:  # the module's own code failed while importing
        raise ModelSpecError(f"importing {module_name!r} for {spec} failed: {type(e).__name__}: {e}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ModelSpecError(f"{module_name} has no attribute {attr!r} ({spec})")
    if isinstance(factory, nn.Module):
        return _checked(factory, spec)
    if not callable(factory):
        raise ModelSpecError(f"{spec} is a {type(factory).__name__}, neither an nn.Module nor a factory to call")
    try:
        inspect.signature(factory).bind()
    except TypeError:
        raise ModelSpecError(f"{spec} cannot be called without arguments; name a factory that builds the model "
                             "by itself (e.g. a function returning the configured module)") from None
    except ValueError:  # a builtin without a signature: let the call decide
        pass
    try:
        built = factory()
    except Exception as e:  # the user's factory failed: its message, on one line, not a traceback
        raise ModelSpecError(f"{spec}() raised {type(e).__name__}: {' '.join(str(e).split())}") from None
    return _checked(built, spec)


# ----------------------------------------------------------------------------- lists of model specs


def split_weights(item: str) -> tuple[str, Path | None]:
    """``SPEC=WEIGHTS_FILE`` → ``(SPEC, Path(WEIGHTS_FILE))``; a plain spec → ``(spec, None)``.

    The split is at the last ``=``, unless that ``=`` is a query option's (``hub:DIR:ENTRY?size=224``
    has no weights file, ``hub:DIR:ENTRY?size=224=w.pth`` has); an empty side is a
    :class:`ModelSpecError` about ``spec``."""
    spec, sep, weights = item.rpartition("=")
    if not sep:
        return item, None
    _, query_sep, query = spec.partition("?")
    if query_sep and "=" not in query.rsplit("&", 1)[-1]:  # the last '=' is the last option's own
        return item, None
    if not spec.strip() or not weights.strip():
        raise ModelSpecError(f"{item!r} is not SPEC=WEIGHTS_FILE")
    return spec.strip(), Path(weights.strip())


def short_name(model_id: str) -> str:
    """The short label of a model spec (a table's column name), as its model source spells it.

    ``supervised`` → ``supervised``; ``pkg.mod:factory`` → ``factory``; ``dir/x.safetensors`` →
    ``x``; ``torchvision:resnet18=r18.pth`` → ``resnet18`` (a weights file is not part of the
    label); ``torchvision:resnet50:IMAGENET1K_V2`` → ``resnet50:IMAGENET1K_V2``;
    ``hub:DIR:ENTRY?size=224`` → ``ENTRY``; ``pkg.mod:net?mean=…&std=…`` → ``net``;
    ``SOURCE:NAME`` → ``SOURCE``'s
    :attr:`ModelSource.label` of ``NAME``.
    """
    model_id = split_weights(model_id)[0] if "=" in model_id else model_id
    head, sep, name = model_id.partition(":")
    if sep and _SOURCE_NAME.fullmatch(head) and head in _REGISTRY.names():
        source = _REGISTRY.get(head)
        return source.label(name if source.options else name.partition("?")[0])
    model_id = model_id.partition("?")[0]  # options (a normalisation) are not part of a label
    if ":" in model_id and not Path(model_id).exists():
        return _last_part(model_id)
    return Path(model_id).name.split(".")[0] if ("/" in model_id or "." in Path(model_id).name) else model_id


def parse_model_list(text: str) -> list[str]:
    """The specs of a comma-separated list (each a spec :func:`resolve_model` takes, optionally
    ``SPEC=WEIGHTS_FILE``); ``"all"`` is every model the bare model sources list (the zoo).

    An empty list, ``all`` with an empty zoo, or a spec named twice is a :class:`ModelSpecError`
    about ``spec``."""
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if specs == ["all"]:
        specs = [name for source in model_sources().values() if source.bare for name in source.names()]
        if not specs:
            raise ModelSpecError("all: the model zoo has no models yet (see `uap models`)")
    if not specs:
        raise ModelSpecError("the model list is empty: give model names separated by commas, or 'all'")
    if len(set(specs)) != len(specs):
        raise ModelSpecError(f"the model list names a model twice: {text}")
    return specs


def load_models(specs: Sequence[str], device: str | torch.device = "cpu") -> dict[str, nn.Module]:
    """``{label: model on device}`` for ``specs`` (as :func:`parse_model_list` gives them), in order.

    Each spec is resolved by :func:`resolve_model` (a ``SPEC=WEIGHTS_FILE`` with that weights
    file); its label is :func:`short_name`, or the whole spec when an earlier model took that
    label (the weights file is part of a model's identity: ``a=w1.pth,a=w2.pth`` are two models).
    Errors are those of :func:`resolve_model` and :func:`split_weights`."""
    dev = torch.device(device)
    loaded: dict[str, nn.Module] = {}
    for item in specs:
        spec, weights = split_weights(item)
        model, _ = resolve_model(spec, weights)
        model = model.to(dev)
        label = short_name(item)
        loaded[label if label not in loaded else item] = model
    return loaded
