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

Each module's ``SOURCE`` is declared once, as an entry point of the ``uap.models`` group in
``pyproject.toml``; :mod:`uap.targets` finds them there (in the installed metadata, or in the
checkout's own ``pyproject.toml``), so nothing else lists them.
"""
from __future__ import annotations
