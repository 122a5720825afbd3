"""Training methods: one module per method, one loop (:func:`models.train.train`) for all.

:mod:`models.methods.base` defines a method (:class:`~models.methods.base.TrainingMethod`: a
name, typed hyper-parameters, optimiser defaults, the zoo builder it ships with, the loop's
hooks) and the registry. The registry's first lookup imports every module of this package,
so a method is one file here (or a registration in any imported module); the built-in ones:

- ``supervised`` — cross-entropy on labels (:mod:`models.methods.supervised`), and
  ``airbench``, the airbench recipe on its own network (:mod:`models.methods.airbench`);
- ``simclr``, ``moco``, ``byol``, ``dino`` — self-supervised (one module each), and
  ``dino-distill``, a smaller backbone against a finished DINO run's frozen teacher;
- ``clip`` — image and text towers on generated captions (:mod:`models.methods.clip`).
- ``coca`` and ``simvlm`` — generative captioners on the same captions (:mod:`models.methods.coca`,
  :mod:`models.methods.simvlm`; the model in :mod:`models.coca`).
"""
from __future__ import annotations

from models.methods.base import (
    NoOptions,
    TrainingMethod,
    available_training_methods,
    get_training_method,
    register_training_method,
)

__all__ = ["TrainingMethod", "NoOptions", "register_training_method", "get_training_method",
           "available_training_methods"]
