"""Backbones from a local torch.hub repository as the model source ``hub`` (e.g. a DINOv2 checkout).

Spelling: ``hub:DIR:ENTRY`` — ``DIR`` a folder with a ``hubconf.py`` (a git checkout of the
repository), ``ENTRY`` one of its entry points (the public functions of its ``hubconf.py``),
optionally followed by ``?key=value&…`` options:

- ``size`` — the backbone's input size (default 224; other sizes are resized inside) and
  ``resize`` — the shorter side the data loader resizes to before its centre crop (default
  ⌊size / 0.875⌋, ImageNet's evaluation ratio), with ``interpolation`` (``bilinear``, default, or
  ``bicubic`` as DINOv2 evaluates);
- ``mean``, ``std`` — the normalisation the backbone expects, three values separated by ``/``
  (default ImageNet's ``0.485/0.456/0.406`` and ``0.229/0.224/0.225``);
- ``probe`` — the head: ``linear`` (default; a linear probe on the frozen features) or ``knn``
  (weighted kNN, :class:`uap.probes.KNNHead`), with ``k`` neighbours (default 20).

The entry is called as ``torch.hub.load(DIR, ENTRY, source="local", pretrained=False)``: the
repository's own code builds the architecture, nothing is downloaded, and the weights come
from a weights file (a state dict or safetensors, read without unpickling code) when one is
given (``--weights``, ``--models hub:DIR:ENTRY=FILE``); without one the backbone keeps the
entry's initialisation (a random-weights baseline).

A backbone has no classes of its own, so the target is a :class:`HubProbed`: ``.encoder`` is the
backbone (with the resize and normalisation in front of it: images in [0, 1] → features),
usable at once for label-free attacks (``--method feature``) and embedding metrics; the head
is fitted on labelled images with :meth:`HubProbed.fit_probe`. The command line fits it on the
*crafting side* of ``--probe-data`` (the ``train`` split: a folder's ``train/``, or for a
single-split folder the images the split rule keeps for crafting), never on held-out images.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from uap.adapters.base import INTERPOLATIONS, AdaptedClassifier
from uap.targets import ModelSource, ModelSpecError, load_weights, split_query

__all__ = ["SOURCE", "load", "label", "HubProbed", "parse_spec", "entry_points", "PROBES"]

#: The heads a hub backbone can get.
PROBES = ("linear", "knn")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_OPTIONS = ("size", "resize", "interpolation", "mean", "std", "probe", "k")


class HubProbed(nn.Module):
    """A hub backbone with a probe: ``head(encoder(x))`` for images ``x`` in [0, 1].

    ``encoder`` is an :class:`~uap.adapters.base.AdaptedClassifier` around the backbone (resize
    to its input size, normalisation, backbone → N×D features); ``head`` is ``None`` until
    :meth:`fit_probe`. ``preprocessing`` is the encoder's (for the data loader).
    """

    def __init__(self, encoder: AdaptedClassifier, *, probe: str = "linear", k: int = 20,
                 source: dict | None = None) -> None:
        super().__init__()
        if probe not in PROBES:
            raise ModelSpecError(f"probe must be one of {', '.join(PROBES)}, got {probe!r}")
        self.encoder = encoder
        self.head: nn.Module | None = None
        self.probe, self.k = probe, int(k)
        self.preprocessing = encoder.preprocessing
        self.classes: tuple[str, ...] | None = None
        self.source = dict(source or {})
        self.probe_info: dict = {}

    def fit_probe(self, x, y: torch.Tensor, classes: Sequence[str] | None = None, *, epochs: int = 100,
                  seed: int = 0, batch_size: int = 64) -> HubProbed:
        """Fit the head on labelled images ``(x, y)`` (a tensor or :class:`uap.images.Images`),
        never the images the target is later measured on; returns self."""
        from uap.probes import KNNHead, extract_features, train_linear_probe

        if len(x) != len(y) or len(y) == 0:
            raise ValueError(f"fit_probe needs one label per image (got {len(x)} images, {len(y)} labels)")
        num_classes = len(classes) if classes is not None else int(y.max()) + 1
        with torch.no_grad():
            features = extract_features(self.encoder, x, batch_size=batch_size).float().flatten(1).cpu()
        y = y.long().cpu()
        if self.probe == "linear":
            head: nn.Module = train_linear_probe(features, y, num_classes, epochs=epochs, seed=seed)
        else:
            head = KNNHead(features, y, num_classes, k=self.k)
        for p in head.parameters():
            p.requires_grad_(False)
        self.head = head.to(next(self.encoder.buffers()).device).eval()
        self.classes = tuple(classes) if classes is not None else None
        self.probe_info = {"probe": self.probe, "images": len(y), "classes": num_classes}
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            spec = self.source.get("spec", "this hub model")
            raise ValueError(f"{spec} has no probe yet: call model.fit_probe(images, labels) on labelled images "
                             "(the CLI fits it on the train split of --probe-data)")
        return self.head(self.encoder(x).flatten(1))


def parse_spec(name: str) -> tuple[Path, str, dict]:
    """``DIR:ENTRY[?options]`` → ``(DIR, ENTRY, options)`` with checked, typed options."""
    body, pairs = split_query(name)
    folder, sep, entry = body.rpartition(":")
    if not sep or not folder or not entry:
        raise ModelSpecError(f"hub:{name} is not hub:DIR:ENTRY (a folder with hubconf.py, then an entry point)")
    options: dict = {}
    for key, value in pairs:
        if key not in _OPTIONS:
            raise ModelSpecError(f"hub:{name}: unknown option {key!r}; options are {', '.join(_OPTIONS)}")
        try:
            if key in ("size", "resize", "k"):
                options[key] = int(value)
                if options[key] < 1:
                    raise ValueError
            elif key in ("mean", "std"):
                options[key] = tuple(float(t) for t in value.split("/"))
                if len(options[key]) != 3:
                    raise ValueError
            else:
                options[key] = value
        except ValueError:
            want = "three numbers separated by /" if key in ("mean", "std") else "a positive integer"
            raise ModelSpecError(f"hub:{name}: option {key} must be {want}, got {value!r}") from None
    return Path(folder).expanduser(), entry, options


def entry_points(folder: Path) -> list[str]:
    """The entry points of the local repository ``folder``: the public callables of its
    ``hubconf.py`` (what ``torch.hub.list`` gives for a GitHub repository), imported the way
    ``torch.hub.load(..., source="local")`` imports it (the folder first on ``sys.path``)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("hubconf", folder / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(folder))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return sorted(n for n in dir(module) if not n.startswith("_") and n != "dependencies"
                  and callable(getattr(module, n)) and getattr(getattr(module, n), "__module__", None) == "hubconf")


def load(name: str, weights: Path | None = None) -> nn.Module:
    """The probed target for ``hub:DIR:ENTRY[?options]`` (module docstring), without its head yet."""
    folder, entry, options = parse_spec(name)
    spec = f"hub:{name}"
    if not folder.is_dir():
        raise ModelSpecError(f"{spec}: the hub folder {folder} does not exist")
    if not (folder / "hubconf.py").is_file():
        raise ModelSpecError(f"{spec}: {folder} has no hubconf.py (a torch.hub repository checkout is needed)")
    try:
        entries = entry_points(folder)
    except Exception as e:  # hubconf.py itself fails to import (a missing dependency …)
        raise ModelSpecError(f"{spec}: {folder}/hubconf.py cannot be loaded: {' '.join(str(e).split())}") from None
    if entry not in entries:
        raise ModelSpecError(f"{spec}: {folder}/hubconf.py has no entry {entry!r}; it has {', '.join(entries) or 'none'}")
    try:
        backbone = torch.hub.load(str(folder), entry, source="local", pretrained=False)
    except TypeError:  # an entry without a pretrained argument
        backbone = torch.hub.load(str(folder), entry, source="local")
    if not isinstance(backbone, nn.Module):
        raise ModelSpecError(f"{spec} did not give an nn.Module (got {type(backbone).__name__})")
    if weights is not None:
        load_weights(backbone, weights, spec)
    size = options.get("size", 224)
    resize = options.get("resize", math.floor(size / 0.875))
    if resize < size:
        raise ModelSpecError(f"{spec}: resize ({resize}) must be at least size ({size})")
    interpolation = options.get("interpolation", "bilinear")
    if interpolation not in INTERPOLATIONS:
        raise ModelSpecError(f"{spec}: interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    encoder = AdaptedClassifier(backbone, mean=options.get("mean", _IMAGENET_MEAN), std=options.get("std", _IMAGENET_STD),
                                resize=resize, crop=size, interpolation=interpolation, fixed_size=True)
    return HubProbed(encoder, probe=options.get("probe", "linear"), k=options.get("k", 20),
                     source={"spec": spec, "weights": None if weights is None else str(weights)})


def _names() -> list[str]:
    return []  # an open-ended source: any local repository


def label(name: str) -> str:
    """The short name of ``DIR:ENTRY[?options]``: ``ENTRY``."""
    return name.partition("?")[0].rpartition(":")[2]


#: The adapter as a model source (entry point ``hub`` of the ``uap.models`` group).
SOURCE = ModelSource(load=load, names=_names, weights=True, library="", label=label, options=_OPTIONS,
                     help="hub:DIR:ENTRY[?size=224&mean=a/b/c&std=a/b/c&probe=linear|knn&k=20], DIR a local torch.hub "
                          "repository with hubconf.py; the probe is fitted on --probe-data's train split")
