"""Resolve a ``--model`` argument into a classifier the engine can attack.

A *target* is an ``nn.Module`` taking images in ``[0, 1]`` (N×3×H×W) and returning logits
(N×C); normalisation lives inside it. Three spellings are accepted, the same in
``uap craft`` and ``uap evaluate``:

- a zoo name (``supervised``, ``simclr`` …) or a path to a zoo-style checkpoint —
  delegated to :func:`models.load`;
- ``package.module:factory`` — a user's own model: ``factory()`` builds the module, weights
  come from ``weights`` (safetensors, or a state dict read with
  ``torch.load(..., weights_only=True)``, which cannot run code), and ``mean``/``std`` wrap it
  in a normalisation layer when it expects normalised input.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

__all__ = ["Normalized", "resolve_model", "load_state_dict_file"]


class Normalized(nn.Module):
    """``model((x - mean) / std)``: lets a model that expects normalised input take [0, 1]."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"--mean has {len(mean)} values but --std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError("--std values must be > 0")
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights without unpickling arbitrary objects (safetensors or ``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refusing a global, a corrupt file …
        raise ValueError(f"could not read {path} as a state dict (weights_only): {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def resolve_model(
    spec: str,
    weights: str | Path | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[nn.Module, str]:
    """Return ``(model, model_id)`` for a zoo name, checkpoint path or ``module:factory``.

    The model is put in eval mode with gradients of its parameters disabled (the engine only
    needs gradients with respect to the input).
    """
    if not spec:
        raise ValueError("--model is empty: give a zoo name (see `uap models`) or package.module:factory")
    is_factory = ":" in spec and not Path(spec).exists() and not spec[1:3] == ":\\"
    if is_factory:
        model = _build_factory(spec)
        if weights is not None:
            state = load_state_dict_file(weights)
            try:
                model.load_state_dict(state)
            except RuntimeError as e:
                first = str(e).strip().splitlines()[0]
                raise ValueError(f"weights in {weights} do not fit {spec}: {first}") from None
        model_id = spec
    else:
        if weights is not None:
            raise ValueError("--weights is only used with --model package.module:factory")
        import models

        model = models.load(spec)
        model_id = spec
    if (mean is None) != (std is None):
        raise ValueError("give both --mean and --std, or neither")
    if mean is not None:
        model = Normalized(model, mean, std)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, model_id


def _build_factory(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import {module_name!r} for --model {spec}: {e}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ValueError(f"{module_name} has no attribute {attr!r} (--model {spec})")
    model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec} did not give an nn.Module (got {type(model).__name__})")
    return model
