"""Where a crafting run starts: ``v = 0``, a baseline, or an earlier perturbation.

:func:`uap.craft` takes ``init``:

- ``None`` — ``v = 0`` (Algorithm 1's start);
- a registered baseline's name (``"chessboard2n"``, ``"random"``, ``"fourier"`` …,
  :mod:`uap.baselines`) — its row for the run's image shape, budget and seed; a baseline that
  needs models or crafting images gets the run's (``fourier`` searches on the crafting images
  of each model: one model, or an ensemble whose models give one row each, is refused);
- a path — a perturbation file (``.safetensors`` as :meth:`Perturbation.save` writes it) or a
  ``uap craft`` run folder (:func:`uap.saved.load_perturbations`);
- a :class:`~uap.perturbation.Perturbation` or a C×H×W tensor.

The start is put into the run's ball by the exact projection :func:`uap.project_lp` (a
baseline at the run's budget is in it already). :func:`describe_init` is what the run records
(``extra["init"]`` and the run folder's record): the baseline's name, or the file and the
SHA-256 of its tensor, so a run from another file is another run even under the same path.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Union

import torch
from torch import nn

from uap.fingerprint import tensor_fingerprint
from uap.perturbation import Perturbation
from uap.projection import project_lp

__all__ = ["Init", "describe_init", "initial_perturbation"]

#: What ``init`` may be (see the module docstring).
Init = Union[None, str, os.PathLike, Perturbation, torch.Tensor]


def _baseline(init: Any) -> str | None:
    """``init`` when it names one baseline row of the registry, else None (a path); a family or
    group of several rows that is no existing path is a ``ValueError``."""
    from uap.baselines import available_baselines, parse_baselines

    if not isinstance(init, str):
        return None
    name = init.strip().lower()
    if name in available_baselines():
        return name
    if Path(init).exists():
        return None
    try:
        rows = parse_baselines(name)
    except ValueError:
        return None
    if len(rows) > 1:
        raise ValueError(f"init {init!r} names {len(rows)} baselines ({', '.join(rows)}); give one of them")
    return None


def _load(init: str | os.PathLike) -> tuple[Perturbation, str]:
    """The perturbation in a file or run folder, and the file it came from."""
    from uap.saved import load_perturbations

    path = Path(init)
    if not path.exists() and not Path(f"{path}.safetensors").exists():
        raise FileNotFoundError(f"init {str(init)!r} is neither a baseline nor a perturbation file or run folder")
    (pert,) = load_perturbations([path]).values()
    return pert, str(path / "perturbation.safetensors" if path.is_dir() else path)


def describe_init(init: Init) -> Any:
    """What a run records about its start (JSON): None, the baseline's name, or ``{"file", "sha256"}``
    / ``{"tensor_sha256"}`` (the fingerprint of the starting tensor as given, before projection)."""
    if init is None:
        return None
    name = _baseline(init)
    if name is not None:
        return name
    if isinstance(init, (str, os.PathLike)):
        pert, path = _load(init)
        return {"file": path, "sha256": tensor_fingerprint(pert.v)}
    v = init.v if isinstance(init, Perturbation) else init
    if not torch.is_tensor(v):
        raise ValueError(f"init must be a baseline name, a perturbation file or run folder, a Perturbation or a "
                         f"tensor, got {type(init).__name__}")
    return {"tensor_sha256": tensor_fingerprint(v.detach().cpu())}


def initial_perturbation(init: Init, shape: tuple[int, ...], eps: float, p: float, *, seed: int = 0,
                         models: Mapping[str, nn.Module] | None = None, x_craft: torch.Tensor | None = None,
                         batch_size: int | None = None) -> tuple[torch.Tensor | None, Any]:
    """``(v₀, description)``: the start ``init`` for images of ``shape`` in the ball ``‖v‖_p ≤ eps``
    (float32 on the CPU; None for ``init=None``) and :func:`describe_init`'s record of it."""
    from uap.baselines import build_baselines

    if init is None:
        return None, None
    shape = tuple(int(s) for s in shape)
    name = _baseline(init)
    if name is not None:
        extra = {} if batch_size is None else {"batch_size": batch_size}
        built = build_baselines(name, shape, eps, p, seed=seed, models=models, x_craft=x_craft, **extra)
        if len(built.perturbations) != 1:
            raise ValueError(f"init {name!r} gives one row per model ({', '.join(built.perturbations)}); "
                             "start an ensemble from one perturbation")
        (v,) = built.perturbations.values()
        return project_lp(v.float(), eps, p), name
    described = describe_init(init)
    if isinstance(init, (str, os.PathLike)):
        v = _load(init)[0].v
    else:
        v = init.v if isinstance(init, Perturbation) else init
    v = v.detach().to("cpu", torch.float32)
    if tuple(v.shape) != shape:
        raise ValueError(f"init perturbation is {tuple(v.shape)}, the run's images are {shape}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError("init perturbation has NaN or infinite values")
    return project_lp(v, eps, p), described
