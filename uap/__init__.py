"""uap — universal adversarial perturbations.

The public API; see README.md for a tour.

- :func:`craft` — Algorithm 1 of Moosavi-Dezfooli et al. (CVPR 2017) and its variants
  (methods are pluggable: :func:`register_method`, :class:`Method`);
- :func:`deepfool` — batched multi-class DeepFool (ℓ2, ℓ∞; untargeted and targeted);
- :func:`fold_batchnorm` — a batch-norm-folded copy of a model, the same function, faster to attack;
- :func:`project_lp` — exact Euclidean projection onto ℓ1 / ℓ2 / ℓ∞ balls;
- :func:`fooling_rate`, :func:`accuracy`, :func:`targeted_success_rate` … — metrics;
- :func:`evaluate`, :func:`transfer_matrix` — every perturbation on every model;
- :func:`random_perturbation`, :func:`chessboard`, :func:`fourier_search`, :func:`build_baselines`
  … — baselines of the same norm (:mod:`uap.baselines`; pluggable: :func:`register_baseline`,
  :class:`Baseline`);
- :func:`craft_run` — :func:`craft` in a resumable, locked run folder (what ``uap craft`` does);
- :class:`Perturbation` and :class:`Report` — the artefacts (safetensors + JSON).

Internals stay reachable by their module path (``uap.methods``, ``uap.metrics.CleanPredictions``,
``uap.universal.visiting_order`` …).
"""
from __future__ import annotations

__version__ = "0.1.0"

from uap.threads import reproducible_across_threads

reproducible_across_threads()  # before anything runs a model: v must not depend on --threads

from uap import data
from uap.baselines import (
    Baseline,
    build_baselines,
    chessboard,
    fourier_search,
    gaussian_perturbation,
    random_perturbation,
    register_baseline,
)
from uap.deepfool import deepfool
from uap.evaluate import evaluate
from uap.fold import fold_batchnorm
from uap.methods import Method, available_methods, register_method
from uap.metrics import accuracy, clean_predictions, dominant_label, fooling_rate, predict
from uap.perturbation import Perturbation
from uap.projection import lp_norm, project_lp
from uap.report import Report
from uap.runs import craft_run
from uap.criteria import targeted_success_rate
from uap.transfer import Transfer, transfer_matrix
from uap.universal import craft

__all__ = [
    "__version__",
    "data",
    # crafting
    "craft",
    "craft_run",
    "deepfool",
    "fold_batchnorm",
    "project_lp",
    "lp_norm",
    "Method",
    "register_method",
    "available_methods",
    # metrics
    "fooling_rate",
    "accuracy",
    "targeted_success_rate",
    "predict",
    "clean_predictions",
    "dominant_label",
    # artefacts and evaluation
    "Perturbation",
    "Report",
    "evaluate",
    "transfer_matrix",
    "Transfer",
    # baselines
    "random_perturbation",
    "gaussian_perturbation",
    "chessboard",
    "fourier_search",
    "build_baselines",
    "Baseline",
    "register_baseline",
]
