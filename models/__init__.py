"""Target models built in this repo: backbones, SSL methods, CLIP, probes and the zoo.

``models.load(name_or_path)`` returns a zoo classifier (images in [0, 1] → logits, in eval
mode, with ``.encoder``); ``models.available()`` lists the zoo; see :mod:`models.zoo` for how
an entry is stored and how a new builder is registered (:func:`register_zoo_builder`).
Training methods are :mod:`models.methods`; :mod:`models.train` is the one loop.
"""
from __future__ import annotations

from models.zoo import available, cards, load, load_card, register_zoo_builder

__all__ = ["load", "available", "cards", "load_card", "register_zoo_builder"]
