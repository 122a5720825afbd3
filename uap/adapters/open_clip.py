"""open_clip's CLIP models as zero-shot targets: the model source ``open_clip`` (needs
``pip install 'uap[hub]'``).

Spellings:

- ``open_clip:ARCH`` (``ARCH`` as open_clip spells it, e.g. ``ViT-B-32``) with a weights file:
  a state dict or safetensors file, read without unpickling code
  (:func:`uap.targets.load_state_dict_file`; open_clip's own training checkpoints,
  ``{"state_dict": …}`` with DDP's ``module.`` prefix, are read the same way);
- ``open_clip:ARCH:TAG`` — a pretrained tag (``ViT-B-32:laion2b_s34b_b79k``) read from the
  Hugging Face hub cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``:
  ``models--ORG--NAME/snapshots/*/open_clip_model.safetensors`` or
  ``open_clip_pytorch_model.bin``). Nothing is downloaded; a missing file is one line saying
  where to put it. (OpenAI's original TorchScript archives cannot be read without unpickling
  and are refused.)

The target is an :class:`OpenCLIPClassifier`: a zero-shot head over class names, built with
the engine's prompt ensemble (:func:`uap.prompts.class_text_weights` over
:data:`uap.prompts.ZERO_SHOT_TEMPLATES`, the zoo's CLIP's rule), so the logits are
``exp(logit_scale) · cos(image embedding, class weight)`` (+ ``logit_bias`` for SigLIP
models). The class names come from the data: :meth:`OpenCLIPClassifier.use_classes` (the CLI
calls it with the dataset's classes after loading the images). ``.encoder`` is the normalised
image embedding, for label-free attacks and embedding metrics. The preprocessing (mean/std,
input size, interpolation) is open_clip's for the architecture; the image tower takes only its
native size, so other sizes are resized inside.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from uap.adapters.base import INTERPOLATIONS, AdaptedClassifier
from uap.prompts import ZERO_SHOT_TEMPLATES, class_text_weights
from uap.targets import ModelSource, ModelSpecError, load_weights

__all__ = ["SOURCE", "names", "load", "OpenCLIPClassifier", "cache_candidates"]

_MISSING = ("open_clip is not installed: pip install 'uap[hub]' (or pip install open-clip-torch) to use "
            "open_clip:ARCH models")
_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise ModelSpecError(_MISSING) from None
    return open_clip


def names() -> list[str]:
    """Every architecture open_clip can build (``open_clip.list_models()``); empty without it."""
    try:
        import open_clip
    except ImportError:
        return []
    return list(open_clip.list_models())


class _ImageEmbedding(nn.Module):
    """Images in [0, 1] → unit-norm image embeddings of an :class:`OpenCLIPClassifier`
    (its resize, normalisation and image tower; the tower's parameters are the classifier's)."""

    def __init__(self, owner: OpenCLIPClassifier) -> None:
        super().__init__()
        self.visual = owner.model.visual  # registered here too, so hooks and eval mode reach it
        self.__dict__["owner"] = owner    # not a submodule: the classifier is not a part of its encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(self.owner.normalize(self.owner.resized(x))), dim=-1)


class OpenCLIPClassifier(AdaptedClassifier):
    """An open_clip model as a zero-shot classifier: images in [0, 1] → logits over the classes
    given to :meth:`use_classes`; ``.encoder`` gives the normalised image embeddings.

    ``model`` is the whole open_clip model (``model.encode_text`` still works), ``tokenizer``
    open_clip's tokenizer for the architecture. The state dict holds ``model.*`` and, once
    classes are set, ``class_weights``.
    """

    def __init__(self, net: nn.Module, tokenizer, *, mean: Sequence[float], std: Sequence[float], size: int,
                 interpolation: str, source: dict | None = None) -> None:
        super().__init__(net, mean=mean, std=std, resize=size, crop=size, interpolation=interpolation,
                         fixed_size=True, source=source)
        self.tokenizer = tokenizer
        self.templates: tuple[str, ...] = ()
        self.__dict__["encoder"] = _ImageEmbedding(self)

    def resized(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` at the image tower's native size (bilinear, as :class:`AdaptedClassifier` does)."""
        if tuple(x.shape[-2:]) != self.fixed_size:
            x = F.interpolate(x, size=self.fixed_size, mode="bilinear", align_corners=False, antialias=False)
        return x

    @torch.no_grad()
    def use_classes(self, classes: Sequence[str], templates: Sequence[str] = ZERO_SHOT_TEMPLATES,
                    batch_size: int = 256) -> OpenCLIPClassifier:
        """Build the zero-shot head for ``classes`` (prompt-ensembled text embeddings); returns self."""
        was_training = self.model.training
        self.model.eval()
        device = self.mean.device
        try:
            weights = class_text_weights(lambda prompts: self.model.encode_text(self.tokenizer(prompts).to(device)),
                                         list(classes), templates, chunk=batch_size)
        finally:
            self.model.train(was_training)
        self.register_buffer("class_weights", weights.to(device))
        self.classes, self.templates = tuple(classes), tuple(templates)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = getattr(self, "class_weights", None)
        if weights is None:
            spec = self.source.get("spec", "this open_clip model")
            raise ValueError(f"{spec} is a zero-shot classifier without classes yet: call model.use_classes(class "
                             "names) first (the CLI uses the dataset's class names)")
        logits = self.model.logit_scale.exp() * self.encoder(x) @ weights.T
        bias = getattr(self.model, "logit_bias", None)
        return logits if bias is None else logits + bias


def cache_candidates(pretrained_cfg: dict) -> list[Path]:
    """The local files that may hold a pretrained tag's weights (Hugging Face hub cache)."""
    hub_id = (pretrained_cfg.get("hf_hub") or "").strip("/")
    if not hub_id:
        return []
    hf_home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    hub_cache = Path(os.environ.get("HF_HUB_CACHE") or Path(hf_home) / "hub").expanduser()
    snapshots = hub_cache / ("models--" + hub_id.replace("/", "--")) / "snapshots"
    found = [f for name in _FILES for f in sorted(snapshots.glob(f"*/{name}"))]
    return found or [snapshots / "*" / _FILES[0]]


def load(name: str, weights: Path | None = None) -> nn.Module | None:
    """The zero-shot classifier for ``open_clip:ARCH`` or ``open_clip:ARCH:TAG`` (module
    docstring), without classes yet; ``None`` when open_clip has no architecture ``ARCH``."""
    open_clip = _open_clip()
    arch, _, tag = name.partition(":")
    if arch not in open_clip.list_models():
        return None
    spec = f"open_clip:{name}"
    if tag:
        if weights is not None:
            raise ModelSpecError(f"{spec} names a pretrained tag; give either the tag or a weights file, not both",
                                 "spec", "weights")
        if tag not in open_clip.list_pretrained_tags_by_model(arch):
            known = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
            raise ModelSpecError(f"open_clip has no pretrained tag {tag!r} for {arch}: use one of {known}")
        places = cache_candidates(open_clip.get_pretrained_cfg(arch, tag))
        weights = next((p for p in places if p.is_file()), None)
        if weights is None:
            where = " or ".join(str(p) for p in places) or "(this tag names no Hugging Face file; give a weights file)"
            raise ModelSpecError(f"{spec}: the weights are not in the local Hugging Face cache and nothing is "
                                 f"downloaded; put them at {where}, or give a weights file", "spec", "weights")
    elif weights is None:
        raise ModelSpecError(f"{spec} needs weights: a weights file (state dict or safetensors), or a pretrained tag "
                             f"from the local Hugging Face cache (open_clip:{arch}:TAG)", "spec", "weights")
    net = open_clip.create_model(arch, pretrained=None)
    _load_checkpoint(net, weights, spec)
    try:
        tokenizer = open_clip.get_tokenizer(arch)
    except Exception as e:  # a tokenizer that would have to be fetched from the hub
        raise ModelSpecError(f"{spec}: open_clip's tokenizer for {arch} is not available offline ({e})") from None
    prep = _preprocessing(open_clip.get_model_preprocess_cfg(net), spec)
    return OpenCLIPClassifier(net, tokenizer, mean=prep["mean"], std=prep["std"], size=prep["size"],
                              interpolation=prep["interpolation"], source={"spec": spec, "weights": str(weights)})


def _load_checkpoint(net: nn.Module, weights: Path, spec: str) -> None:
    """open_clip weights from ``weights`` (state dict, training checkpoint or safetensors), strictly."""

    def adapt(state: dict) -> dict:
        if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
            state = {k[len("module."):]: v for k, v in state.items()}
        if "logit_scale" in state and torch.is_tensor(state["logit_scale"]):  # scalar or 1-d, as open_clip allows
            state["logit_scale"] = state["logit_scale"].reshape(net.logit_scale.shape)
        return state

    load_weights(net, weights, spec, adapt)

def _preprocessing(cfg: dict, spec: str) -> dict:
    """open_clip's evaluation transform: shorter side resized to the input size, centre crop."""
    size = cfg.get("size", 224)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ModelSpecError(f"{spec} takes {size[0]}×{size[1]} inputs; only square inputs are supported")
        size = size[0]
    mode = cfg.get("resize_mode") or "shortest"
    if mode != "shortest":
        raise ModelSpecError(f"{spec} preprocesses with resize_mode={mode!r}; only 'shortest' (resize + centre crop) "
                             "is supported")
    interpolation = cfg.get("interpolation") or "bicubic"
    return {"size": int(size), "interpolation": interpolation if interpolation in INTERPOLATIONS else "bicubic",
            "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}


#: The adapter as a model source (entry point ``open_clip`` of the ``uap.models`` group); its label
#: is the whole name, a weights tag included (``resnet50:IMAGENET1K_V2``).
SOURCE = ModelSource(load=load, names=names, weights=True, library="open_clip",
                     label=lambda name: name,
                     help="open_clip:ARCH with a weights file, or open_clip:ARCH:TAG from the local Hugging Face "
                          "cache; zero-shot over the data's class names")
