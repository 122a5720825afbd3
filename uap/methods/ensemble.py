"""One perturbation against several models: the pass of an ensemble.

:func:`uap.craft` takes a list of models; ``v`` then maximises the **mean of the models'
objectives** (each model with its own clean predictions)::

    J_ens(x_adv, B) = (1/M) Σ_m J_m(x_adv, B)

A method whose ``run_pass`` handles ``ctx.members()`` itself declares ``ensembles = True``
(``gd-uap``). A projected-ascent method (:class:`uap.methods.ascent.Ascent`: ``sgd``,
``feature`` …) is ensembled here without knowing it: its own ``run_pass`` runs with the
objective replaced by the mean of the objectives it builds for each member, so its step,
minibatches, memory splitting and distributed reduction are those of one model. With two
identical models the mean equals either objective and the run equals the one-model run; with
one model nothing here runs at all. Algorithm 1's methods (an inner DeepFool or Foolbox attack
per image, against one model) are refused by :func:`check_ensemble`.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch

from uap.methods.base import CraftContext, Method

__all__ = ["ensemble_pass", "check_ensemble", "can_ensemble"]


def _objective_builder(method: Method) -> Callable | None:
    """The method's per-pass objective builder (``objective(ctx)``), if it is an ascent method."""
    build = getattr(type(method), "objective", None)
    return build if callable(build) else None


def can_ensemble(method: Method) -> bool:
    """Whether ``method`` crafts against several models (its own ``ensembles``, or an objective)."""
    return bool(method.ensembles) or _objective_builder(method) is not None


def check_ensemble(method: Method, n_models: int) -> None:
    """``ValueError`` (one line) when ``method`` cannot craft against ``n_models`` > 1 models."""
    if n_models > 1 and not can_ensemble(method):
        raise ValueError(f"method {method.name!r} crafts against one model (its inner step attacks one model per "
                         "image); an ensemble takes a projected-ascent method (sgd, feature …) or gd-uap")


def ensemble_pass(method: Method, ctx: CraftContext) -> None:
    """One pass of ``method`` against every model of ``ctx.members()`` (see the module docstring)."""
    if len(ctx.members()) <= 1 or method.ensembles:
        method.run_pass(ctx)
        return
    build = _objective_builder(method)
    assert build is not None, "check_ensemble refuses such a method before crafting"
    members, objectives = ctx.members(), []
    for member in members:  # built in order; a builder may set v (a random start): the next ones see it
        member.v = ctx.v
        objectives.append(build(method, member))
        ctx.v = member.v
    splittable = all(method.splittable_for(m) for m in members) if hasattr(method, "splittable_for") else True

    def mean_objective(x_adv: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        values, masks = zip(*(objective(x_adv, idx) for objective in objectives))
        fooled = None if any(m is None for m in masks) else torch.stack(masks).all(dim=0)  # fooled for every model
        return torch.stack(values).mean(), fooled

    view = copy.copy(method)  # the method as it is, its objective the members' mean
    view.objective = lambda _ctx: mean_objective  # type: ignore[method-assign]
    view.splittable_for = lambda _ctx: splittable  # type: ignore[method-assign]
    view.run_pass(ctx)
