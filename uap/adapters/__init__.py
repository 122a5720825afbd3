"""Adapters: model libraries (torchvision, timm, open_clip, torch.hub) as model sources of :mod:`uap.targets`.

Each adapter is one small module that turns a library's architecture plus a weights file into
a target with the engine's contract (:class:`~uap.adapters.base.AdaptedClassifier`: images in
``[0, 1]`` → logits, the weights' normalisation inside, resized inside when the architecture
only takes one input size) and carries the weights' preprocessing for the data loader. The
libraries are imported inside the functions that need them, so importing an adapter is cheap
and a missing library is an error only when one of its models is asked for.

Spellings (``uap models --external`` lists them):

- ``torchvision:NAME`` with a weights file, or ``torchvision:NAME:WEIGHTS`` (a weights enum,
  e.g. ``resnet50:IMAGENET1K_V2``) read from torchvision's local cache;
- ``timm:NAME`` with a weights file, or from timm's local cache;
- ``open_clip:ARCH`` with a weights file, or ``open_clip:ARCH:TAG`` from the Hugging Face
  cache: a zero-shot classifier over the data's class names, with the image tower as ``.encoder``;
- ``hub:DIR:ENTRY`` — a backbone from a local torch.hub repository (``DIR/hubconf.py``) as
  ``.encoder``, with a linear or kNN probe fitted on labelled images the user names.

An installed ``uap`` publishes the adapters as entry points of the ``uap.models`` group
(``pyproject.toml``). :func:`register_adapters` registers the ones that no entry point
publishes (a source checkout whose installed metadata predates them); with the entry points
installed it does nothing.
"""
from __future__ import annotations

import importlib

__all__ = ["ADAPTERS", "register_adapters"]

#: source name → ``module:attribute`` of its :class:`uap.targets.ModelSource` (as in pyproject.toml)
ADAPTERS: dict[str, str] = {
    "torchvision": "uap.adapters.torchvision:SOURCE",
    "timm": "uap.adapters.timm:SOURCE",
    "open_clip": "uap.adapters.open_clip:SOURCE",
    "hub": "uap.adapters.hub:SOURCE",
}


def register_adapters() -> list[str]:
    """Register every adapter that no installed entry point or registration provides yet.

    Returns the names registered now (empty when the installed metadata already has them).
    """
    from uap.targets import register_model_source, source_names

    known, added = set(source_names()), []
    for name, target in ADAPTERS.items():
        if name in known:
            continue
        module, _, attr = target.partition(":")
        register_model_source(name, getattr(importlib.import_module(module), attr))
        added.append(name)
    return added
