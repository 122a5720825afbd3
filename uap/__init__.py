"""uap — universal adversarial perturbations.

The public API is re-exported here; see README.md for a tour.

- :func:`craft` — Algorithm 1 of Moosavi-Dezfooli et al. (CVPR 2017) and its variants
  (methods are pluggable: :func:`register_method`);
- :func:`deepfool` — batched multi-class DeepFool (ℓ2, ℓ∞);
- :func:`fold_batchnorm` — a batch-norm-folded copy of a model, the same function, faster to attack;
- :func:`project_lp` — exact Euclidean projection onto ℓ1 / ℓ2 / ℓ∞ balls;
- :func:`fooling_rate`, :func:`accuracy`, :func:`clean_predictions` … — metrics;
- :class:`Perturbation` — the artefact (safetensors + JSON).
"""
from __future__ import annotations

__version__ = "0.1.0"

from uap import data  # noqa: E402
from uap.deepfool import deepfool  # noqa: E402
from uap.fold import fold_batchnorm  # noqa: E402
from uap.metrics import (  # noqa: E402
    CleanPredictions,
    accuracy,
    clean_predictions,
    dominant_label,
    fooling_rate,
    predict,
)
from uap.perturbation import Perturbation  # noqa: E402
from uap.projection import lp_norm, project_lp  # noqa: E402
from uap.universal import available_methods, craft, register_method, visiting_order  # noqa: E402
from uap import methods  # noqa: E402,F401  (registers sgd, feature, deepfool-targeted, foolbox:…)
from uap.methods import targeted_success_rate  # noqa: E402
from uap.evaluate import evaluate  # noqa: E402
from uap.report import Report  # noqa: E402
from uap.transfer import Transfer, transfer_matrix  # noqa: E402
from uap.baseline import random_perturbation  # noqa: E402

__all__ = [
    "__version__",
    "data",
    # crafting
    "craft",
    "deepfool",
    "fold_batchnorm",
    "project_lp",
    "lp_norm",
    "register_method",
    "available_methods",
    "visiting_order",
    "methods",
    "targeted_success_rate",
    # metrics
    "fooling_rate",
    "accuracy",
    "predict",
    "clean_predictions",
    "CleanPredictions",
    "dominant_label",
    # artefacts
    "Perturbation",
    # evaluation (issue 6)
    "evaluate",
    "Report",
    "transfer_matrix",
    "Transfer",
    "random_perturbation",
]
