"""The one forward path: how the engine runs a target on a batch of images.

Every part of the toolkit that runs a model (metrics, evaluation, figures, the crafting
methods, DeepFool) goes through here, so they agree on what a target is and how it is run:

- a target is an ``nn.Module`` taking images in [0, 1] (N×C×H×W) and returning N×C logits
  (:func:`logits_of` checks that), run in eval mode (:func:`eval_mode`) on the device of its
  parameters (:func:`model_device`);
- image batches are validated once (:func:`check_images`: shape, floating dtype, finite values
  in [0, 1]; :func:`check_dtype`: the model's own dtype) and run ``DEFAULT_BATCH_SIZE`` at a
  time (:func:`batches`), or fewer when the images are large (``INFERENCE_BUDGET``); a model that raises on valid images (built for another image size)
  is a :class:`ModelInputError` naming the shape, not a traceback from inside its layers;
- :class:`Inference` is the gradient-free pass every measurement uses: predicted labels of
  ``x`` or of ``clip(x + v, 0, 1)``, and, for a model with an ``.encoder``
  (:func:`encoder_of`), its embeddings, captured by a forward hook in the same pass when the
  model's ``forward`` calls its own encoder;
- under ``torch.distributed`` (:mod:`uap.distributed`) each rank runs its share of the images
  and every rank gets all outputs, in order, so every metric is the one-process metric;
- on the CPU, oneDNN's convolutions run faster on batches in channels-last memory layout, so
  :class:`BatchLayout` uses it for batches of more than one image (a single image stays
  contiguous: PyTorch's native kernels are as fast at that size) of a model where that layout
  is safe (:func:`channels_last_suitable`: none of the narrow strided 1×1 convolutions that
  oneDNN gets wrong in that layout). The layout changes only how a tensor is stored, not its values. Not
  every model accepts it (one that calls ``.view`` on its input raises a ``RuntimeError``);
  :class:`BatchLayout` then falls back to the contiguous layout for the rest of its life, so a
  failing model costs one extra pass, once.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch import nn

from uap.distributed import gather_rows, is_distributed, shard, world
from uap.images import Images, as_rows, is_images

__all__ = [
    "DEFAULT_BATCH_SIZE", "BatchLayout", "channels_last_suitable", "memory_format_for", "Inference", "Outputs",
    "logits_of", "model_device", "eval_mode", "check_images", "check_perturbation", "check_dtype", "ModelInputError",
    "batches", "encoder_of", "encoder_features",
]

T = TypeVar("T")

#: Slack of the [0, 1] range check: float rounding of an image computed in float32.
_RANGE_TOLERANCE = 1e-6

#: Images per forward pass wherever the caller does not choose.
DEFAULT_BATCH_SIZE = 256

#: Input elements per forward pass that a gradient-free batch is capped at: 32 images of
#: 3×224×224. A batch of 256 224² photographs holds ~1.2 GB of input alone and its activations
#: several times that, and runs slower per image on a CPU than a batch of 32 (measured on
#: EfficientNet-Lite0: 31 ms against 22 ms per image); CIFAR-size images (up to 256 per batch at
#: 79×79 and below) are unaffected. The cap only splits a batch: each image's outputs stay its own.
INFERENCE_BUDGET = 32 * 3 * 224 * 224


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
        model.train(modes[0][1])  # the model's own train() first: a custom override may rely on being called …
        for m, training in modes:  # … then each submodule's own flag, e.g. a frozen part stays in eval
            m.training = training


def check_images(x: torch.Tensor | Images, name: str = "x") -> torch.Tensor | Images:
    """Validate an image batch: a non-empty floating ``N×C×H×W`` tensor of finite values in [0, 1].

    Targets take raw images and normalise inside (see :class:`uap.targets.Normalized`), and
    ``clip(x + v, 0, 1)`` only means something for images in [0, 1], so normalised or 0–255
    images are refused here rather than giving quietly wrong numbers; so are NaNs, which would
    otherwise turn into arbitrary labels. The value check is a single ``aminmax`` reduction
    (NaN propagates into both ends), one pass over the tensor: cheap next to running a model
    over the same images.

    An :class:`uap.images.Images` set (uint8 pixels, floats per batch) is in range by
    construction; only its shape is checked.
    """
    if is_images(x):
        if len(x) == 0:
            raise ValueError(f"{name} is empty: need at least one image, got shape {tuple(x.shape)}")
        return x
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of images in [0, 1]")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape N×C×H×W, got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: need at least one image, got shape {tuple(x.shape)}")
    lo, hi = (float(t) for t in torch.stack(torch.aminmax(x)).tolist())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} has NaN or infinite values: images must be finite, in [0, 1]")
    if lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
        hint = "; divide 0–255 images by 255" if lo >= -_RANGE_TOLERANCE and hi > 2 else ""
        raise ValueError(f"{name} must be images in [0, 1] (normalisation lives inside the model), "
                         f"got values in [{lo:.4g}, {hi:.4g}]{hint}")
    return x


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating parameter (else buffer); None when it has neither."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def check_dtype(model: nn.Module, x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """Validate that the images ``x`` have the floating dtype the model computes in.

    A float64 batch given to a float32 model (``torch.from_numpy`` of a float64 array is the
    usual way to get one) otherwise fails deep inside the first layer with a message about
    bias types; a model of its own dtype (a float64 reference model) takes images of that dtype.
    """
    dtype = model_dtype(model)
    if dtype is not None and x.dtype != dtype:
        raise ValueError(f"{name} is {str(x.dtype).removeprefix('torch.')} but the model computes in "
                         f"{str(dtype).removeprefix('torch.')}: convert the images with "
                         f"x.to(torch.{str(dtype).removeprefix('torch.')})")
    return x


class ModelInputError(ValueError):
    """The model raised an error on a batch of valid images: it does not take images of this shape
    (a classifier built for another image size or channel count, weights for another input)."""


def check_perturbation(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Validate that ``v`` (C×H×W, or 1×C×H×W) fits the images ``x`` (N×C×H×W)."""
    if not torch.is_tensor(v) or not v.is_floating_point():
        raise ValueError("the perturbation must be a floating-point tensor")
    if v.dim() == 4 and v.shape[0] == 1:
        v = v[0]
    if tuple(v.shape) != tuple(x.shape[1:]):
        raise ValueError(f"perturbation shape {tuple(v.shape)} does not match image shape {tuple(x.shape[1:])}")
    return v


def batches(x: torch.Tensor | Images, batch_size: int) -> Iterator[torch.Tensor]:
    """``x`` in consecutive slices of ``batch_size`` images (float tensors, also from an
    :class:`uap.images.Images` set, which converts one batch at a time), fewer per slice when
    ``batch_size`` images would exceed :data:`INFERENCE_BUDGET` input elements."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    per_image = max(1, math.prod(x.shape[1:]))
    batch_size = max(1, min(batch_size, INFERENCE_BUDGET // per_image))
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


#: Fewest input channels a strided 1×1 convolution may have for channels-last to be safe on the
#: CPU: oneDNN's 1×1 weight-gradient kernel for channels-last (nhwc) input with a stride reduces
#: the input to unit stride in a workspace it sizes for a whole channel block, and with fewer
#: channels than the block (8 floats with AVX2, 16 with AVX-512) writes past it: a segfault, heap
#: corruption (``free(): invalid next size``), a hang, or silently wrong weight gradients,
#: depending on the thread count (oneDNN issue #6035; reproduced here with ``resnet18_cifar(width=4)``
#: under ``ONEDNN_MAX_CPU_ISA=AVX2``: in_channels 3–7 fail, 8–12 pass). 16 covers both block sizes.
CHANNELS_LAST_MIN_CHANNELS = 16


def channels_last_suitable(model: nn.Module) -> bool:
    """Whether channels-last is the layout to run ``model`` in on the CPU.

    True unless the model has a strided 1×1 convolution with fewer than
    :data:`CHANNELS_LAST_MIN_CHANNELS` input channels per group (the shape oneDNN's channels-last
    kernel gets wrong, see the constant). A structural rule rather than a trial run: the failure
    is not always a crash, it can be wrong weight gradients, which a probe would not see.
    """
    return not any(
        isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and max(m.stride) > 1
        and m.in_channels // m.groups < CHANNELS_LAST_MIN_CHANNELS for m in model.modules())


def memory_format_for(model: nn.Module, device: torch.device | str) -> torch.memory_format:
    """The memory layout to train or run ``model`` in on ``device``: channels-last on CUDA (cuDNN's
    fast path) and on the CPU where :func:`channels_last_suitable`, else contiguous."""
    if torch.device(device).type == "cuda" or channels_last_suitable(model):
        return torch.channels_last
    return torch.contiguous_format


class BatchLayout:
    """Runs a model on image batches, channels-last on the CPU while the model accepts it.

    One instance serves one model for one run (a DeepFool call, a crafting pass, one
    evaluation): it is where the "this model rejects channels-last" finding is kept. Given the
    model, channels-last is tried only where :func:`channels_last_suitable` says it is safe;
    without it (a caller that knows its model runs no weight gradients), on every CPU batch.
    """

    def __init__(self, device: torch.device, model: nn.Module | None = None) -> None:
        self.channels_last = device.type == "cpu" and (model is None or channels_last_suitable(model))

    def logits(self, model: nn.Module, x: torch.Tensor, *, track: bool = False,
               autocast: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_used, model(x_used))``: ``x`` in the chosen layout, and its N×C logits.

        With ``track`` the pass records the graph from ``x_used`` (which then requires
        grad), for gradients w.r.t. the input; otherwise it runs without autograd. With
        ``autocast`` (e.g. ``torch.bfloat16``) the forward pass runs under autocast to that
        type; ``x_used`` stays in its own dtype, so its gradient does too.
        """
        return self.apply(lambda xu: _run(model, xu, track, autocast), x)

    def apply(self, fn: Callable[[torch.Tensor], T], x: torch.Tensor) -> T:
        """``fn(x)`` with ``x`` in the chosen layout; a ``RuntimeError`` in channels-last
        switches this instance to contiguous and runs ``fn`` again (``fn`` must not have
        effects that a second call would repeat)."""
        if self.channels_last and x.dim() == 4 and x.shape[0] > 1:
            try:
                return fn(x.contiguous(memory_format=torch.channels_last))
            except RuntimeError:
                self.channels_last = False
        try:
            return fn(x.contiguous())
        except torch.cuda.OutOfMemoryError:
            raise  # about the batch size, not about the images
        except RuntimeError as e:  # a shape or dtype the model's layers cannot take
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ModelInputError(f"the model cannot run on images of shape {tuple(x.shape[1:])} "
                                  f"(batch {tuple(x.shape)}): {detail}") from e


def _run(model: nn.Module, x: torch.Tensor, track: bool,
         autocast: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: gradient-free, or recording the graph from ``x``."""
    if track and not x.requires_grad:
        x.requires_grad_(True)
    cast = torch.autocast(x.device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with torch.set_grad_enabled(track), cast:
        return x, logits_of(model, x)


# ---------------------------------------------------------------------------- encoders

def encoder_of(model: nn.Module, *, required: bool = False, needed_by: str = "embeddings") -> Any:
    """The model's ``.encoder`` (images in [0, 1] → features), or ``None`` when it has none.

    An encoder is ``model.encoder``, an ``nn.Module`` or any callable (the zoo's classifiers,
    probes and CLIP's zero-shot head expose one). With ``required`` a missing encoder is a
    ``ValueError`` that starts with ``needed_by`` (e.g. ``"method 'feature'"``).
    """
    encoder = getattr(model, "encoder", None)
    if callable(encoder):
        return encoder
    if required:
        raise ValueError(f"{needed_by} needs a target with an .encoder (images in [0, 1] → features); "
                         f"{type(model).__name__} has none")
    return None


def encoder_features(encoder: Callable[[torch.Tensor], Any], x: torch.Tensor, name: str = "model") -> torch.Tensor:
    """``encoder(x)``, checked to be a tensor with one row per image (``N×D`` or ``N×…``).

    Runs under whatever autograd mode the caller chose (a crafting objective differentiates
    through it) and returns the features as the encoder gave them, not flattened or cast.
    """
    out = encoder(x)
    if not _is_features(out, x.shape[0]):
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ValueError(f"{name}.encoder must return an N×D feature tensor (N={x.shape[0]} images), got {shape}")
    return out


def _is_features(out: Any, n: int) -> bool:
    return torch.is_tensor(out) and out.dim() >= 2 and out.shape[0] == n


def _flat(features: torch.Tensor) -> torch.Tensor:
    return features.reshape(features.shape[0], -1).float()


# ---------------------------------------------------------------------------- inference

@dataclass(frozen=True)
class Outputs:
    """One model's outputs on a set of images, on the CPU.

    ``predictions`` (N,) int64 labels; ``embeddings`` (N×D float32, flattened) for a model with
    an encoder when they were asked for, else ``None``; ``num_classes`` the width of the
    logits when this came from a forward pass (``None`` when the labels came from elsewhere,
    such as the clean-prediction cache).
    """

    predictions: torch.Tensor
    embeddings: torch.Tensor | None = None
    num_classes: int | None = None


class Inference:
    """Gradient-free batched passes of one model: the path every measurement takes.

    ``Inference(model, embeddings=True)(x, v)`` runs ``model`` on ``clip(x + v, 0, 1)`` (or on
    ``x`` without ``v``) ``batch_size`` images at a time, in eval mode (modes restored after),
    without autograd, on the model's device, in :class:`BatchLayout`'s layout, and returns
    :class:`Outputs` on the CPU.

    With ``embeddings`` and a model that has an encoder (:func:`encoder_of`), the embeddings
    come from the same pass: a forward hook on the encoder captures its output while the model
    runs, so a probe on top of an encoder does not run the encoder twice. The hook is trusted
    only after the first batch showed it equal to a direct ``encoder(x)`` call (a model may
    call its encoder on transformed input, or not at all); otherwise, and for encoders that
    are not modules, the encoder is called directly. One instance serves one model and keeps
    that finding, and the layout's, across calls.
    """

    def __init__(self, model: nn.Module, *, embeddings: bool = False, name: str = "model") -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"{name} is a {type(model).__name__}, expected an nn.Module (a target classifier)")
        self.model, self.name = model, name
        self.encoder = encoder_of(model) if embeddings else None
        self.device = model_device(model)
        self.layout = BatchLayout(self.device, model)
        #: None: not decided yet (first batch); True: the hook's capture is used; False: direct calls.
        self.use_hook: bool | None = None if isinstance(self.encoder, nn.Module) else False

    def __call__(self, x: torch.Tensor | Images, v: torch.Tensor | None = None, *,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> Outputs:
        """Labels (and embeddings, when asked for and available) on ``clip(x + v, 0, 1)`` or ``x``."""
        check_dtype(self.model, check_images(x))
        if v is not None:
            v = check_perturbation(v, x).to(device=self.device, dtype=x.dtype)
        n, sharded = x.shape[0], is_distributed() and x.shape[0] >= world()[1]
        preds, embs, num_classes = [], [], 0
        with self._running():
            for xb in batches(as_rows(x, shard(n)) if sharded else x, batch_size):  # under torch.distributed: this rank's share
                xb = xb.to(self.device)
                if v is not None:
                    xb = (xb + v).clamp_(0.0, 1.0)
                logits, emb = self.layout.apply(self._step, xb)
                num_classes = logits.shape[1]
                preds.append(logits.argmax(dim=1).cpu())
                if emb is not None:
                    embs.append(emb.cpu())
        predictions, embeddings = torch.cat(preds), torch.cat(embs) if embs else None
        if sharded:  # every rank gets every image's outputs, in order
            predictions = gather_rows(predictions, n)
            embeddings = None if embeddings is None else gather_rows(embeddings, n)
        return Outputs(predictions, embeddings, num_classes)

    def embeddings(self, x: torch.Tensor | Images, *, batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor | None:
        """Encoder features of ``x`` alone (N×D float32, CPU), without running the classifier;
        ``None`` for a model without an encoder (or an instance made without ``embeddings``)."""
        check_dtype(self.model, check_images(x))
        if self.encoder is None:
            return None
        n, sharded = x.shape[0], is_distributed() and x.shape[0] >= world()[1]
        with self._running():
            features = torch.cat([self.layout.apply(self._direct, xb.to(self.device)).cpu()
                                  for xb in batches(as_rows(x, shard(n)) if sharded else x, batch_size)])
        return gather_rows(features, n) if sharded else features

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(eval_mode(self.model))
            if isinstance(self.encoder, nn.Module):  # an encoder kept outside the model's own modules
                stack.enter_context(eval_mode(self.encoder))
            yield

    def _direct(self, xb: torch.Tensor) -> torch.Tensor:
        return _flat(encoder_features(self.encoder, xb, self.name))

    def _step(self, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of one batch and, with an encoder, its flattened embeddings."""
        if self.encoder is None:
            return logits_of(self.model, xb), None
        if self.use_hook is False:
            return logits_of(self.model, xb), self._direct(xb)
        captured: list[Any] = []
        handle = self.encoder.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            logits = logits_of(self.model, xb)
        finally:
            handle.remove()
        hooked = _flat(captured[0]) if len(captured) == 1 and _is_features(captured[0], len(xb)) else None
        if self.use_hook is None:  # first batch: trust the hook only if it equals a direct call
            direct = self._direct(xb)
            self.use_hook = hooked is not None and hooked.shape == direct.shape and torch.allclose(
                hooked, direct, rtol=1e-4, atol=1e-5)
            return logits, direct
        return logits, hooked if hooked is not None else self._direct(xb)
