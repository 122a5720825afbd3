"""Crafting methods: what happens inside one pass of :func:`uap.craft`.

:mod:`uap.methods.base` defines a method (:class:`~uap.methods.base.Method`: a name, typed
options, target support, ``run_pass``), the per-pass :class:`~uap.methods.base.CraftContext`
and the registry. Two loops carry every built-in method:

- :mod:`uap.methods.algorithm1` — Algorithm 1 of Moosavi-Dezfooli et al. (CVPR 2017) with a
  pluggable inner step: ``"deepfool"``, ``"deepfool-batched"``, ``"deepfool-targeted"``
  (:mod:`uap.methods.deepfool`) and ``"foolbox:<AttackName>"``, any Foolbox minimisation attack
  (:mod:`uap.methods.foolbox_step`);
- :mod:`uap.methods.ascent` — projected steepest ascent on ``v``: ``"sgd"``, SGD-UAP of Shafahi
  et al. (AAAI 2020, :mod:`uap.methods.sgd`); ``"sga"``, its stochastic gradient aggregation by
  Liu et al. (ICCV 2023, :mod:`uap.methods.sga`); ``"cos-uap"``, the label-free cosine loss on
  the logits of Zhang et al. (ICCV 2021, :mod:`uap.methods.cos_uap`); and ``"feature"``,
  label-free UAPs for encoders (:mod:`uap.methods.feature`);
- ``"gd-uap"`` (:mod:`uap.methods.gd_uap`), the data-free GD-UAP of Mopuri et al. (TPAMI 2018):
  projected ascent on the log activations of every convolutional layer, with no crafting
  images (prior none or range) or with them (prior data).

Several models at once (an ensemble) go through :mod:`uap.methods.ensemble`.

Importing this package registers them. All go through the same driver, so the per-pass
history, stop rule and artefact are the same for every method and results compare directly.
"""
from __future__ import annotations

from uap.methods import cos_uap, deepfool, feature, foolbox_step, gd_uap, sga, sgd  # noqa: F401  (register the built-in methods)
from uap.methods.base import (
    CraftContext,
    Method,
    available_methods,
    get_method,
    make_method,
    register_method,
)

__all__ = ["Method", "CraftContext", "register_method", "get_method", "make_method", "available_methods"]
