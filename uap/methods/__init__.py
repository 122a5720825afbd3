"""Crafting methods beyond Algorithm 1 with DeepFool; importing this package registers them.

Each module registers one ``method=`` of :func:`uap.craft` (and ``--method`` of ``uap craft``)
through :func:`uap.universal.register_method`:

- ``"sgd"`` — SGD-UAP (Shafahi et al., AAAI 2020): minibatch projected sign-gradient ascent
  on a clamped cross-entropy vs the clean predictions (:mod:`uap.methods.sgd`);
- ``"deepfool-targeted"`` — targeted Algorithm 1 with DeepFool restricted to the target class
  (:mod:`uap.methods.targeted`); ``"sgd"`` and ``"foolbox:…"`` take a target too;
- ``"feature"`` — label-free UAPs for encoders: maximise ``1 − cos(f(x), f(x+v))`` of
  ``model.encoder`` (:mod:`uap.methods.feature`);
- ``"foolbox:<AttackName>"`` — any Foolbox minimisation attack as Algorithm 1's inner step
  (:mod:`uap.methods.foolbox_step`).

All of them go through the same driver, so the per-pass history, stop rule and artefact are
the same for every method and results compare directly.
"""
from __future__ import annotations

from uap.methods.ascent import ascent_direction
from uap.methods.feature import embedding_distance, feature_uap_pass
from uap.methods.foolbox_step import FoolboxStep, foolbox_attack, foolbox_pass
from uap.methods.sgd import clamped_cross_entropy, sgd_uap_pass
from uap.methods.targeted import (
    target_margin,
    targeted_deepfool,
    targeted_deepfool_pass,
    targeted_success_rate,
)

__all__ = [
    "ascent_direction",
    "clamped_cross_entropy",
    "embedding_distance",
    "targeted_deepfool",
    "targeted_success_rate",
    "target_margin",
    "foolbox_attack",
    "FoolboxStep",
    "sgd_uap_pass",
    "feature_uap_pass",
    "targeted_deepfool_pass",
    "foolbox_pass",
]
