"""The model zoo: ``name → (weights.safetensors, card.json)``, turned into a classifier by a builder.

An entry is exactly two files in ``models/zoo/`` (or anywhere, when given as a path):

- ``NAME.safetensors`` — the classifier's ``state_dict`` (tensors only; nothing is unpickled);
- ``NAME.json`` — the model card: method, backbone, hyper-parameters, accuracies, the exact
  ``uap train`` command, ``sha256`` of the weights file, and ``"builder"``: the name of the
  :class:`ZooBuilder` that rebuilds the ``nn.Module`` from the card before the weights are loaded.

A zoo builder is one registered class with two halves: :meth:`ZooBuilder.build` turns a
finished training run into the classifier that ships and its card (the training method names
its builder, :attr:`models.methods.TrainingMethod.zoo_builder`), and :meth:`ZooBuilder.rebuild`
makes the un-initialised classifier (images in [0, 1] → logits, with ``.encoder``) whose
``state_dict`` keys match the weights file. Adding one is one class and one registration::

    @register_zoo_builder("mine")
    class MyBuilder(ZooBuilder):
        def rebuild(self, card): ...
        def build(self, method, config, data, say, probe_epochs): ...

A plain function ``card -> nn.Module`` registers a builder that only rebuilds (entries written
with :func:`save_entry`). The built-in builders, ``"probed"`` and ``"clip"``, live in
:mod:`models.zoo_build`, and ``"coca"`` and ``"simvlm"`` in :mod:`models.captioner_zoo`,
imported on the first lookup.

The engine finds the zoo through :data:`MODEL_SOURCE`, published as the ``zoo`` entry point
of the ``uap.models`` group (``pyproject.toml``): ``uap`` resolves ``supervised``,
``supervised@knn``, ``zoo:NAME`` or an entry's path without importing this package.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, TypeVar

from torch import nn

from uap.atomic import atomic_write
from uap.targets import ModelSource

if TYPE_CHECKING:
    from models.methods.base import TrainingMethod
    from models.train import TrainConfig

__all__ = ["ZOO_DIR", "MODEL_SOURCE", "ZooBuilder", "register_zoo_builder", "get_zoo_builder", "zoo_builders",
           "available", "cards", "load", "load_card", "resolve", "save_entry", "sha256_file"]

ZOO_DIR = Path(__file__).resolve().parent / "zoo"

#: ``(train x, train y, test x, test y)``: the images a builder measures an entry on
Data = tuple[Any, Any, Any, Any]


class ZooBuilder:
    """Base class of zoo builders (see the module docstring)."""

    name: ClassVar[str] = ""

    def rebuild(self, card: dict[str, Any]) -> nn.Module:
        """The un-initialised classifier of an entry with this ``card`` (its weights are loaded after)."""
        raise NotImplementedError

    def build(self, method: TrainingMethod, config: TrainConfig, data: Data | None, say: Callable[[str], None],
              probe_epochs: int) -> tuple[nn.Module, dict[str, Any]]:
        """``(classifier, card)`` of the finished run's ``method`` (trained with ``config``),
        measured on ``data`` (default: the full CIFAR-10 splits); ``say`` reports progress.
        The card names this builder (``"builder"``)."""
        raise ValueError(f"zoo builder {self.name!r} only rebuilds entries; it cannot make one from a training run")

    def summary(self, card: dict[str, Any]) -> str:
        """The card's headline result, one line (for a front end to print)."""
        return ""


class _FunctionBuilder(ZooBuilder):
    """A builder registered as a plain ``card -> nn.Module`` function: it rebuilds, nothing else."""

    def __init__(self, name: str, rebuild: Callable[[dict[str, Any]], nn.Module]) -> None:
        self.name, self._rebuild = name, rebuild

    def rebuild(self, card: dict[str, Any]) -> nn.Module:
        return self._rebuild(card)


_BUILDERS: dict[str, ZooBuilder] = {}
B = TypeVar("B")


def register_zoo_builder(name: str) -> Callable[[B], B]:
    """Register a :class:`ZooBuilder` subclass (one instance serves every entry) or a function
    ``card -> nn.Module`` (a builder that only rebuilds) as builder ``name``: ``card["builder"] ==
    name`` rebuilds with it, and a training method with ``zoo_builder = name`` ships through it.
    Usable as a decorator; registering a name again replaces its builder."""
    if not name or not isinstance(name, str):
        raise ValueError("a zoo builder needs a non-empty name")

    def decorate(obj: B) -> B:
        if isinstance(obj, type) and issubclass(obj, ZooBuilder):
            builder = obj()
            builder.name = name
        elif callable(obj) and not isinstance(obj, type):
            builder = _FunctionBuilder(name, obj)
        else:
            raise ValueError(f"register_zoo_builder takes a ZooBuilder subclass or a function card -> nn.Module, "
                             f"got {obj!r}")
        _BUILDERS[name] = builder
        return obj

    return decorate


def _builtin() -> None:
    import models.captioner_zoo  # noqa: F401  (registers "coca" and "simvlm")
    import models.zoo_build  # noqa: F401  (registers "probed" and "clip")


def get_zoo_builder(name: str) -> ZooBuilder:
    """The builder registered as ``name``; ``ValueError`` listing the known ones."""
    _builtin()
    if not isinstance(name, str) or name not in _BUILDERS:
        raise ValueError(f"no zoo builder {name!r} is registered (known: {', '.join(sorted(_BUILDERS))})")
    return _BUILDERS[name]


def zoo_builders() -> list[str]:
    """The registered builder names."""
    _builtin()
    return sorted(_BUILDERS)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def available(zoo_dir: str | os.PathLike | None = None) -> list[str]:
    """Names of the zoo entries that have both a weights file and a card."""
    d = Path(zoo_dir) if zoo_dir is not None else ZOO_DIR
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.json") if (d / f"{p.stem}.safetensors").is_file())


def cards(zoo_dir: str | os.PathLike | None = None) -> dict[str, dict]:
    """``{name: model card}`` for every entry of the zoo."""
    d = Path(zoo_dir) if zoo_dir is not None else ZOO_DIR
    return {name: json.loads((d / f"{name}.json").read_text()) for name in available(d)}


def _find_entry(name_or_path: str | os.PathLike, zoo_dir: Path) -> tuple[Path, Path] | None:
    """``(weights, card)`` paths of a zoo name, an entry's file, or a folder holding one entry."""
    text = str(name_or_path)
    if text in available(zoo_dir):
        return zoo_dir / f"{text}.safetensors", zoo_dir / f"{text}.json"
    p = Path(text).expanduser()
    if p.suffix in (".safetensors", ".json") and p.is_file():
        return p.with_suffix(".safetensors"), p.with_suffix(".json")
    if p.is_dir() and len(available(p)) == 1:
        name = available(p)[0]
        return p / f"{name}.safetensors", p / f"{name}.json"
    return None


def _entry_paths(name_or_path: str | os.PathLike, zoo_dir: Path) -> tuple[Path, Path]:
    found = _find_entry(name_or_path, zoo_dir)
    if found is not None:
        return found
    text = str(name_or_path)
    names = ", ".join(available(zoo_dir)) or "(empty: train one with `uap train METHOD --zoo NAME`)"
    raise ValueError(f"unknown model {text!r}: not a zoo entry nor a NAME.safetensors/NAME.json path. Zoo: {names}")


def load_card(name_or_path: str | os.PathLike, zoo_dir: str | os.PathLike | None = None) -> dict:
    """The model card of a zoo entry (by name or path)."""
    _, card_path = _entry_paths(name_or_path, Path(zoo_dir) if zoo_dir is not None else ZOO_DIR)
    if not card_path.is_file():
        raise FileNotFoundError(f"model card {card_path} is missing")
    return json.loads(card_path.read_text())


#: ``NAME@knn`` — the zoo entry's encoder with a weighted kNN head (k=200, T=0.1) instead of its
#: linear probe; the feature bank is this many class-balanced CIFAR-10 training images (seed 0),
#: built at load time.
KNN_BANK_SIZE = 10_000


def load(name_or_path: str | os.PathLike, zoo_dir: str | os.PathLike | None = None,
         verify: bool = True) -> nn.Module:
    """The classifier of a zoo entry, in eval mode: images in [0, 1] → logits, with ``.encoder``.

    ``verify`` checks the weights file against the card's sha256; a card without one is refused
    (``ValueError``) rather than loaded unverified.
    ``NAME@knn`` gives the same encoder with a kNN head (see :data:`KNN_BANK_SIZE`), so an
    attack can be measured on a second downstream head of one encoder.
    """
    from safetensors.torch import load as load_safetensors

    text = str(name_or_path)
    if text.endswith("@knn"):
        return _load_knn(text[: -len("@knn")], zoo_dir, verify)

    weights, card_path = _entry_paths(name_or_path, Path(zoo_dir) if zoo_dir is not None else ZOO_DIR)
    for p in (weights, card_path):
        if not p.is_file():
            raise FileNotFoundError(f"zoo entry is incomplete: {p} is missing")
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"model card {card_path} is not valid JSON: {e}") from None
    if not isinstance(card, dict):
        raise ValueError(f"model card {card_path} holds a JSON {type(card).__name__}, not an object")
    blob = weights.read_bytes()  # hashed and parsed from one read: a file replaced in between cannot slip through
    if verify:
        expected = card.get("sha256")
        if not isinstance(expected, str) or not re.fullmatch(r"[0-9a-f]{64}", expected.lower()):
            raise ValueError(f"{card_path} has no valid sha256 of {weights.name}, so its weights cannot be verified; "
                             f"add \"sha256\": \"<sha256sum {weights.name}>\" to the card (or load it with verify=False)")
        if hashlib.sha256(blob).hexdigest() != expected.lower():
            raise ValueError(f"{weights} does not match the sha256 in {card_path.name}; the file is corrupt or replaced")
    builder = card.get("builder", "probed")
    try:
        rebuild = get_zoo_builder(builder).rebuild
    except ValueError as e:
        raise ValueError(f"model card {card_path}: {e}") from None
    model = rebuild(card)
    try:
        state = load_safetensors(blob)
    except Exception as e:  # SafetensorError for a damaged file (only reachable with verify=False)
        raise ValueError(f"could not read {weights} as safetensors (damaged, truncated or not safetensors): "
                         f"{' '.join(str(e).split())}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{weights} does not fit the {card.get('builder')} builder: {str(e).splitlines()[0]}") from None
    model.eval()
    model.card = card  # the metadata travels with the module
    return model


def resolve(spec: str) -> nn.Module | None:
    """The classifier for a zoo name, ``NAME@knn`` or an entry's path; ``None`` when the zoo
    has no such entry (the engine then asks its other model sources)."""
    base = spec[: -len("@knn")] if spec.endswith("@knn") else spec
    return load(spec) if _find_entry(base, ZOO_DIR) is not None else None


#: The zoo as a model source of the engine (:mod:`uap.targets`), published as an entry point.
MODEL_SOURCE = ModelSource(load=resolve, names=available, bare=True,
                           help="NAME or NAME@knn for its encoder with a kNN head, or a path to NAME.safetensors")


def _load_knn(base: str, zoo_dir, verify: bool) -> nn.Module:
    import torch

    from models.probes import KNNClassifier
    from uap import data

    probed = load(base, zoo_dir, verify)
    card = dict(getattr(probed, "card", {}))
    bank_x, bank_y, classes = data.load("cifar10", "train", n=KNN_BANK_SIZE, seed=0)
    with torch.no_grad():
        model = KNNClassifier(probed.encoder, bank_x, bank_y, num_classes=len(classes), k=200, temperature=0.1)
    model.eval()
    model.card = {**card, "name": f"{base}@knn", "head": f"weighted kNN (k=200, T=0.1), bank {KNN_BANK_SIZE} train images"}
    return model


def save_entry(name: str, model: nn.Module, card: dict[str, Any], zoo_dir: str | os.PathLike | None = None) -> dict:
    """Write ``NAME.safetensors`` and ``NAME.json`` atomically; fills ``sha256`` and
    ``size_bytes`` into the card and returns it."""
    from safetensors.torch import save_file

    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"zoo name must be a plain file stem, got {name!r}")
    if "builder" not in card:
        raise ValueError("a model card must name its builder (e.g. 'probed')")
    d = Path(zoo_dir) if zoo_dir is not None else ZOO_DIR
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    weights = d / f"{name}.safetensors"
    atomic_write(weights, lambda tmp: save_file(tensors, str(tmp)))
    card = {**card, "name": name, "sha256": sha256_file(weights), "size_bytes": weights.stat().st_size}
    atomic_write(d / f"{name}.json", json.dumps(card, indent=2) + "\n")
    return card
