"""The one forward path: how the engine runs a target on a batch of images.

Every part of the toolkit that runs a model (metrics, evaluation, figures, the crafting
methods, DeepFool) goes through here, so they agree on what a target is and how it is run:

- a target is an ``nn.Module`` taking images in [0, 1] (N×C×H×W) and returning N×C logits
  (:func:`logits_of` checks that), run in eval mode (:func:`eval_mode`) on the device of its
  parameters (:func:`model_device`);
- image batches are validated once (:func:`check_images`) and run ``DEFAULT_BATCH_SIZE`` at a
  time (:func:`batches`);
- on the CPU, oneDNN's convolutions run faster on batches in channels-last memory layout, so
  :class:`BatchLayout` uses it for batches of more than one image (a single image stays
  contiguous: PyTorch's native kernels are as fast at that size). The layout changes only how
  a tensor is stored, not its values. Not every model accepts it (one that calls ``.view`` on
  its input raises a ``RuntimeError``); :class:`BatchLayout` then falls back to the contiguous
  layout for the rest of its life, so a failing model costs one extra pass, once.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = [
    "DEFAULT_BATCH_SIZE", "BatchLayout", "logits_of", "model_device", "eval_mode", "check_images",
    "check_perturbation", "batches",
]

#: Images per forward pass wherever the caller does not choose.
DEFAULT_BATCH_SIZE = 256


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a parameter-free model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block, then give every submodule back its own mode.

    Attacks must see a deterministic, batch-independent classifier (batch-norm statistics,
    dropout), whatever mode the caller left the model in. The modes are restored module by
    module, so a model that is training around a frozen (eval-mode) part gets exactly that
    back, not ``model.train()`` applied to everything. A model already in eval mode
    throughout is left untouched: attacks enter this block once per DeepFool call, and
    ``model.eval()`` walks (and re-assigns) every module each time.
    """
    modes = [(m, m.training) for m in model.modules()]  # modules() yields the model itself first
    if not any(training for _, training in modes):
        yield model
        return
    model.eval()
    try:
        yield model
    finally:
        model.train(modes[0][1])  # what earlier versions did (and what a custom train() may rely on) …
        for m, training in modes:  # … then each submodule's own flag, e.g. a frozen part stays in eval
            m.training = training


def check_images(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """Validate an image batch: a non-empty floating ``N×C×H×W`` tensor."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of images in [0, 1]")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape N×C×H×W, got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: need at least one image")
    return x


def check_perturbation(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Validate that ``v`` (C×H×W, or 1×C×H×W) fits the images ``x`` (N×C×H×W)."""
    if not torch.is_tensor(v) or not v.is_floating_point():
        raise ValueError("the perturbation must be a floating-point tensor")
    if v.dim() == 4 and v.shape[0] == 1:
        v = v[0]
    if tuple(v.shape) != tuple(x.shape[1:]):
        raise ValueError(f"perturbation shape {tuple(v.shape)} does not match image shape {tuple(x.shape[1:])}")
    return v


def batches(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """``x`` in consecutive slices of ``batch_size`` images."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    for start in range(0, x.shape[0], batch_size):
        yield x[start:start + batch_size]


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
