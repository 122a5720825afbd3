"""Mixed-precision training on CPU: bfloat16 autocast for the networks, float32 for the losses.

On CPUs with native bfloat16 arithmetic (AVX-512 BF16) the networks' convolutions and matrix
products run faster under ``torch.autocast("cpu", dtype=torch.bfloat16)``. The parameters,
their gradients and the optimiser state stay float32 (autocast only casts operands), so no
loss scaling is needed: bfloat16 has float32's exponent range.

Contrastive and distillation losses divide similarities by small temperatures and
exponentiate them; in bfloat16 (8 bits of mantissa) ``cos/0.1`` would be off by up to ~0.04
per logit. :func:`float32_loss` therefore runs a loss function with autocast off and its
tensor arguments upcast, the same split the AMP recipes of SimCLR/DINO use on GPUs.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, TypeVar

import torch

__all__ = ["PRECISIONS", "check_precision", "autocast", "float32_loss"]

PRECISIONS = ("fp32", "bf16")

F = TypeVar("F", bound=Callable[..., Any])


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else ``ValueError``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def autocast(precision: str, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """The context a training step runs in: nothing for ``"fp32"``, bfloat16 autocast for ``"bf16"``."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def _upcast(value: Any) -> Any:
    """Half-precision tensors → float32; float32/float64 and non-float values unchanged."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    if isinstance(value, (list, tuple)):
        return type(value)(_upcast(v) for v in value)
    return value


def float32_loss(fn: F) -> F:
    """Decorator: run ``fn`` in at least float32 even inside an autocast region (half-precision
    tensor arguments, also inside lists/tuples, are upcast; float64 stays float64; autocast is
    disabled for the body)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args, kwargs = _upcast(args), {k: _upcast(v) for k, v in kwargs.items()}
        device_type = next((a.device.type for a in _tensors(args, kwargs)), "cpu")
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _tensors(args: tuple, kwargs: dict):
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from (t for t in v if isinstance(t, torch.Tensor))
