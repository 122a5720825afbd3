"""Baselines: perturbations with no per-image optimisation, at the norm of the UAPs they are compared with.

A universal perturbation's fooling rate means little on its own: what matters is how far
above the *cheapest* perturbation of the same size it lies. This package holds those cheap
perturbations, one registered :class:`Baseline` class each (:mod:`uap.baselines.base`), made
for an image shape, a budget (ε, p) and a seed:

- ``random`` — :func:`random_perturbation`, the random row of Moosavi-Dezfooli et al.
  (CVPR 2017, §3): uniform random signs × ε for ℓ∞ (every pixel at ±ε), a uniformly random
  direction on the sphere for ℓ2 and ℓ1.
- ``gaussian`` — :func:`gaussian_perturbation`: i.i.d. Gaussian noise rescaled to ``‖r‖p = ε``
  (for ℓ∞ most pixels sit well inside the box, so it carries less energy than ``random``).
- ``chessboard1/2/4/8`` and ``chessboard1n/2n/4n/8n`` — :func:`chessboard`: ±1 chessboards with
  square cells of 1, 2, 4 or 8 pixels and their negations, scaled to the budget.
- ``fourier`` — :func:`fourier_search`: the best single Fourier basis perturbation for each
  model, found by a black-box search on crafting images (one row ``fourier:<model>`` each).

:func:`build_baselines` makes the rows for a list of names (:func:`parse_baselines` reads
``"random,chessboard,fourier"``); :func:`uap.evaluate` and :func:`uap.transfer_matrix` show
them as rows flagged as baselines in the :class:`~uap.report.Report`, at the budget of the
perturbations they are compared with (:func:`uap.evaluate.baselines_at_budget`). A new
baseline is one class and ``@register_baseline()`` (docs/architecture.md).

``BASELINES`` (every name, in row order) and ``DATA_FREE`` (those that need no data and no
model) are read from the registry each time, so they include baselines registered later.
"""
from __future__ import annotations

from typing import Any

from uap.baselines import base
from uap.baselines.base import (
    NEEDS,
    Baseline,
    BaselineContext,
    Baselines,
    Row,
    available_baselines,
    build_baselines,
    data_free_baselines,
    get_baseline,
    needs_of,
    parse_baselines,
    register_baseline,
    row_names,
    strongest_baseline,
    unregister_baseline,
)

# Imported in row order: a baseline's rows come where it was registered.
from uap.baselines.noise import Gaussian, Random, gaussian_perturbation, random_perturbation  # isort: skip
from uap.baselines.chessboard import CHESSBOARD_CELLS, CHESSBOARDS, Chessboard, chessboard  # isort: skip
from uap.baselines.fourier import Fourier, FourierOptions, FourierSearch, fourier_basis, fourier_search  # isort: skip

__all__ = [
    *base.__all__,
    "random_perturbation",
    "gaussian_perturbation",
    "chessboard",
    "fourier_basis",
    "fourier_search",
    "FourierSearch",
    "FourierOptions",
    "Random",
    "Gaussian",
    "Chessboard",
    "Fourier",
    "BASELINES",
    "DATA_FREE",
    "CHESSBOARD_CELLS",
    "CHESSBOARDS",
]


def __getattr__(name: str) -> Any:
    if name == "BASELINES":
        return available_baselines()
    if name == "DATA_FREE":
        return data_free_baselines()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
