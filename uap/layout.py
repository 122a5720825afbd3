"""Forward passes of image batches in the memory layout the CPU runs fastest.

On the CPU, oneDNN's convolutions (forward and backward) run faster on image batches in
channels-last memory layout: 1.3× for DeepFool steps on the zoo's ResNet, 1.1–1.5× for
gradient-free passes of 4–200 images (BENCHMARKS.md). A single image is left contiguous:
PyTorch then uses its native kernels, which are as fast at that size. The layout changes
only how the tensor is stored, not its values, so results agree to float rounding.

Not every model accepts the layout (e.g. one that calls ``.view`` on its input raises a
``RuntimeError``); :class:`BatchLayout` then falls back to the contiguous layout and
remembers that for the rest of its life, so a failing model costs one extra pass, once.
"""
from __future__ import annotations

import torch
from torch import nn

from uap.metrics import logits_of

__all__ = ["BatchLayout"]


class BatchLayout:
    """Runs a model on image batches, channels-last on the CPU while the model accepts it.

    One instance serves one model for one run (a DeepFool call, a crafting pass, one
    evaluation): it is where the "this model rejects channels-last" finding is kept.
    """

    def __init__(self, device: torch.device) -> None:
        self.channels_last = device.type == "cpu"

    def logits(self, model: nn.Module, x: torch.Tensor, *, track: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_used, model(x_used))``: ``x`` in the chosen layout, and its N×C logits.

        With ``track`` the pass records the graph from ``x_used`` (which then requires
        grad), for gradients w.r.t. the input; otherwise it runs without autograd.
        """
        if self.channels_last and x.dim() == 4 and x.shape[0] > 1:
            try:
                return _run(model, x.contiguous(memory_format=torch.channels_last), track)
            except RuntimeError:
                self.channels_last = False
        return _run(model, x.contiguous(), track)


def _run(model: nn.Module, x: torch.Tensor, track: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: gradient-free, or recording the graph from ``x``."""
    if not track:
        with torch.no_grad():
            return x, logits_of(model, x)
    x = x if x.requires_grad else x.requires_grad_(True)
    with torch.enable_grad():
        return x, logits_of(model, x)
