"""Perturbations saved by earlier runs: loaded as named rows, and what they record about the
model they were crafted on.

``uap evaluate`` reads files and ``uap craft`` run folders (:func:`load_perturbations`), and
evaluates "the same model" as the same function of the pixels: a model spec that names no
normalisation gets the one its perturbation was crafted with (:func:`reuse_normalisation`).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from uap.perturbation import Perturbation

__all__ = ["unique_name", "load_perturbations", "crafted_normalisation", "reuse_normalisation"]


def unique_name(name: str, taken: Mapping[str, Any]) -> str:
    """``name``, or ``name#2``, ``name#3`` … when it is already ``taken``."""
    key, k = name, 2
    while key in taken:
        key, k = f"{name}#{k}", k + 1
    return key


def load_perturbations(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, Perturbation]:
    """Saved perturbations ``{row name: Perturbation}``, in the order given, to evaluate.

    Each path is a perturbation file (``.safetensors``, or its stem) or a run folder holding
    ``perturbation.safetensors`` (what ``uap craft`` writes). A row is named after the file's
    stem, and a ``perturbation`` file after its folder (the run's name); a repeated name gets a
    ``#2``, ``#3`` … suffix, so no file is silently dropped.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise ValueError("no perturbation files to load")
    out: dict[str, Perturbation] = {}
    for path in map(Path, paths):
        if path.is_dir():
            if not (path / "perturbation.safetensors").is_file():
                raise FileNotFoundError(f"folder {path} holds no perturbation.safetensors (not a `uap craft` run)")
            path = path / "perturbation.safetensors"
        pert = Perturbation.load(path)
        name = path.name.split(".")[0] or str(path)
        if name == "perturbation" and path.parent.name:  # `uap craft` output: named by its run folder
            name = path.parent.name
        out[unique_name(name, out)] = pert
    return out


def crafted_normalisation(perturbation: Any) -> tuple[str, tuple[float, ...], tuple[float, ...]] | None:
    """``(model spec, mean, std)`` of the model a perturbation was crafted on, when it was given a
    normalisation there (in its spec's query, or the run's ``mean``/``std`` settings, as
    ``uap craft`` records them); None otherwise. The spec is returned without its normalisation."""
    from uap.targets import ModelSpecError, split_normalisation

    spec = getattr(perturbation, "model", None)
    if not isinstance(spec, str) or not spec:
        return None
    settings = ((getattr(perturbation, "extra", None) or {}).get("run") or {}).get("settings") or {}
    try:
        body, mean, std = split_normalisation(spec)
        if mean is None and settings.get("mean") is not None and settings.get("std") is not None:
            body, mean, std = split_normalisation(spec, settings["mean"], settings["std"])
    except (ModelSpecError, KeyError, TypeError):  # a model id that is no spec this uap reads
        return None
    return None if mean is None else (body, tuple(map(float, mean)), tuple(map(float, std)))


def reuse_normalisation(specs: Sequence[str], perturbations: Mapping[str, Any] | Sequence[Any]) -> tuple[list[str], list[str]]:
    """Give each model spec (``SPEC`` or ``SPEC=WEIGHTS_FILE``) that names no normalisation, and is
    the spec a perturbation was crafted on with one, that normalisation
    (:func:`uap.targets.with_normalisation`): evaluating on "the same model" then means the
    same function of the pixels. A spec with its own normalisation is left as it is (it
    overrides the record). Returns ``(specs, notes)``, one note per spec changed; perturbations
    crafted on one spec with different normalisations leave it unchanged, with a warning."""
    from uap.targets import split_normalisation, split_weights, with_normalisation

    items = perturbations.values() if isinstance(perturbations, Mapping) else perturbations
    recorded: dict[str, set] = {}
    for p in items:
        found = crafted_normalisation(p)
        if found is not None:
            recorded.setdefault(found[0], set()).add(found[1:])
    out, notes = [], []
    for item in specs:
        spec, weights = split_weights(item)
        body, mean, _ = split_normalisation(spec)
        choices = recorded.get(body, set()) if mean is None else set()
        if len(choices) > 1:
            warnings.warn(f"{spec}: the perturbations were crafted on it with different normalisations; give it one "
                          "(SPEC?mean=a/b/c&std=a/b/c)", UserWarning, stacklevel=2)
        if len(choices) != 1:
            out.append(item)
            continue
        (mean, std), = choices
        spec = with_normalisation(spec, mean, std)
        out.append(spec if weights is None else f"{spec}={weights}")
        notes.append(f"{body}: using the normalisation it was crafted with (mean {'/'.join(f'{m:g}' for m in mean)}, "
                     f"std {'/'.join(f'{v:g}' for v in std)}); give SPEC?mean=…&std=… to override")
    return out, notes
