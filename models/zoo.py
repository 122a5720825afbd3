"""The model zoo: ``name → (weights.safetensors, card.json)``, turned into a classifier by a builder.

An entry is exactly two files in ``models/zoo/`` (or anywhere, when given as a path):

- ``NAME.safetensors`` — the classifier's ``state_dict`` (tensors only; nothing is unpickled);
- ``NAME.json`` — the model card: method, backbone, hyper-parameters, accuracies, the exact
  ``uap train`` command, ``sha256`` of the weights file, and ``"builder"``: the name of the
  function that rebuilds the ``nn.Module`` from the card before the weights are loaded.

Registering a new builder (e.g. CLIP) takes one line, without this module importing yours::

    # in models/zoo.py's BUILDERS table, or at import time of your module:
    register_builder("clip", "models.clip:build_from_card")

``build_from_card(card: dict) -> nn.Module`` must return the un-initialised classifier (images in
[0, 1] → logits, with ``.encoder``) whose ``state_dict`` keys match the weights file; then
:func:`save_entry` writes an entry and :func:`load` finds it. Builders are given as
``"module:function"`` strings and imported on first use, so the zoo never imports heavy or
circular dependencies up front.

The engine finds the zoo through :data:`MODEL_SOURCE`, published as the ``zoo`` entry point
of the ``uap.models`` group (``pyproject.toml``): ``uap`` resolves ``supervised``,
``supervised@knn``, ``zoo:NAME`` or an entry's path without importing this package.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

from torch import nn

from uap.atomic import atomic_write
from uap.targets import ModelSource

__all__ = ["ZOO_DIR", "MODEL_SOURCE", "register_builder", "available", "cards", "load", "load_card", "resolve",
           "save_entry", "sha256_file"]

ZOO_DIR = Path(__file__).resolve().parent / "zoo"

#: builder name → callable or "module:function" taking the card and returning the bare nn.Module
BUILDERS: dict[str, Callable[[dict], nn.Module] | str] = {
    "probed": "models.zoo:build_probed",
    "clip": "models.clip:build_from_card",
}


def register_builder(name: str, builder: Callable[[dict], nn.Module] | str) -> None:
    """Make ``card["builder"] == name`` rebuild models with ``builder`` (a callable or a
    ``"module:function"`` string imported lazily)."""
    if not name or not isinstance(name, str):
        raise ValueError("a builder needs a non-empty name")
    BUILDERS[name] = builder


def _builder(name: str) -> Callable[[dict], nn.Module]:
    if name not in BUILDERS:
        raise ValueError(f"model card names builder {name!r}, but only {sorted(BUILDERS)} are registered")
    b = BUILDERS[name]
    if isinstance(b, str):
        module, _, attr = b.partition(":")
        b = getattr(importlib.import_module(module), attr)
        BUILDERS[name] = b
    return b


def build_probed(card: dict) -> nn.Module:
    """Builder for encoder + linear head (supervised baseline and SSL linear probes)."""
    from models.backbones import build_backbone
    from models.probes import ProbedClassifier

    arch = card["architecture"]
    encoder = build_backbone(arch["backbone"], arch.get("width", 16))
    return ProbedClassifier(encoder, nn.Linear(encoder.out_dim, arch["num_classes"]))


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
    model = _builder(card.get("builder", "probed"))(card)
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
