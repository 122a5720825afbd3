"""Forward passes of image batches in the memory layout the CPU runs fastest.

On the CPU, oneDNN's convolutions (forward and backward) run faster on image batches in
channels-last memory layout: 1.3× for DeepFool steps on the zoo's ResNet, up to 1.6× for
gradient-free passes of a few images and 1.1–1.2× for 200 (BENCHMARKS.md). A single image is
left contiguous: PyTorch then uses its native kernels, which are as fast at that size. The layout changes
only how the tensor is stored, not its values, so results agree to float rounding.

Not every model accepts the layout (e.g. one that calls ``.view`` on its input raises a
``RuntimeError``); :class:`BatchLayout` then falls back to the contiguous layout and
remembers that for the rest of its life, so a failing model costs one extra pass, once.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["BatchLayout", "logits_of"]


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``, checked to be a floating ``N×C`` tensor with one row per image."""
    out = model(x)
    if not torch.is_tensor(out) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ValueError(
            f"the model must return logits of shape N×C (N={x.shape[0]} images), got {shape}; "
            "wrap encoders with a classification head"
        )
    if out.shape[1] < 2:
        raise ValueError(f"the model returns {out.shape[1]} logit per image; a classifier needs at least 2 classes")
    return out


class BatchLayout:
    """Runs a model on image batches, channels-last on the CPU while the model accepts it.

    One instance serves one model for one run (a DeepFool call, a crafting pass, one
    evaluation): it is where the "this model rejects channels-last" finding is kept.
    """

    def __init__(self, device: torch.device) -> None:
        self.channels_last = device.type == "cpu"

    def logits(self, model: nn.Module, x: torch.Tensor, *, track: bool = False,
               autocast: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_used, model(x_used))``: ``x`` in the chosen layout, and its N×C logits.

        With ``track`` the pass records the graph from ``x_used`` (which then requires
        grad), for gradients w.r.t. the input; otherwise it runs without autograd. With
        ``autocast`` (e.g. ``torch.bfloat16``) the forward pass runs under autocast to that
        type; ``x_used`` stays in its own dtype, so its gradient does too.
        """
        if self.channels_last and x.dim() == 4 and x.shape[0] > 1:
            try:
                return _run(model, x.contiguous(memory_format=torch.channels_last), track, autocast)
            except RuntimeError:
                self.channels_last = False
        return _run(model, x.contiguous(), track, autocast)


def _run(model: nn.Module, x: torch.Tensor, track: bool,
         autocast: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: gradient-free, or recording the graph from ``x``."""
    if track and not x.requires_grad:
        x.requires_grad_(True)
    cast = torch.autocast(x.device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with torch.set_grad_enabled(track), cast:
        return x, logits_of(model, x)
