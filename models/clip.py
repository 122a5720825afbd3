"""CLIP built in the repo (Radford et al., "Learning Transferable Visual Models From Natural
Language Supervision", ICML 2021).

The method, as in the paper's Figure 3::

    I_f = image_encoder(images)            # CIFAR ResNet-18 or small ViT (models.backbones)
    T_f = text_encoder(captions)           # causal transformer, <eot> feature (text_transformer)
    I_e = normalise(I_f @ W_i);  T_e = normalise(T_f @ W_t)      # linear maps to a joint space
    logits = I_e @ T_e.T * exp(t)          # learnable temperature: exp(t) = 1/0.07 at init, ≤ 100
    loss = (CE(logits, arange) + CE(logits.T, arange)) / 2        # models.clip_loss.clip_loss

:class:`ZeroShotClassifier` turns a trained CLIP into a *target* for the engine: images in
``[0, 1]`` → logits over classes, where each class weight is the prompt ensemble of its
held-out templates (each prompt embedded and normalised, averaged, re-normalised; paper
§3.1.4). It is differentiable end to end, and ``.encoder`` maps images to the normalised
joint-space embedding for label-free attacks.

A zoo entry is the zero-shot classifier's state dict (``NAME.safetensors``: CLIP weights and
class weights) + ``NAME.json`` (model card: ``"builder": "clip"``, config, tokenizer
vocabulary, classes, held-out templates, metrics); :func:`build_from_card` rebuilds it.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import build_backbone
from models.captions import HELD_OUT_TEMPLATES
from uap.prompts import class_text_weights
from models.clip_loss import clip_loss
from models.text_transformer import TextTransformer
from models.tokenizer import WordTokenizer

__all__ = [
    "CLIPConfig", "CLIP", "ImageEmbedder", "ZeroShotClassifier", "zero_shot_classifier",
    "class_embeddings", "clip_card", "build_from_card", "load_clip",
]


@dataclass(frozen=True)
class CLIPConfig:
    """Architecture of a CLIP model (everything needed to rebuild it from a card).

    Args:
        backbone: image encoder from :mod:`models.backbones` (``resnet18`` or ``vit_small``).
        width: first-stage channels of the CIFAR ResNet-18 (64 in He et al.; ignored for ViT).
        embed_dim: size of the joint image–text space.
        context_length: tokens per caption, ``<sot>``/``<eot>`` included.
        text_width, text_layers, text_heads: the text transformer (paper: 512, 12, 8).
        init_temperature: τ at initialisation (paper: 0.07).
        max_logit_scale: clamp on 1/τ (paper: 100) so training cannot make logits explode.
    """

    backbone: str = "resnet18"
    width: int = 16
    embed_dim: int = 128
    context_length: int = 16
    text_width: int = 64
    text_layers: int = 3
    text_heads: int = 4
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0

    def __post_init__(self):
        if self.embed_dim < 1 or self.width < 1:
            raise ValueError("embed_dim and width must be >= 1")
        if not (self.init_temperature > 0 and 1 / self.init_temperature <= self.max_logit_scale):
            raise ValueError(f"1/init_temperature must be in (0, max_logit_scale={self.max_logit_scale}]")

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown CLIP config keys {sorted(unknown)}")
        return cls(**d)


class CLIP(nn.Module):
    """Image encoder + text transformer, each with a linear projection to the joint space,
    and a learnable logit scale. ``forward`` returns ``(logits_per_image, logits_per_text)``."""

    def __init__(self, config: CLIPConfig, tokenizer: WordTokenizer, visual: nn.Module | None = None):
        """``visual`` is the image encoder to use (default: a new one built from ``config``);
        it must be what ``config.backbone`` and ``config.width`` describe, as the card
        rebuilds it from them."""
        super().__init__()
        if tokenizer.context_length > config.context_length:
            raise ValueError(f"tokenizer context_length {tokenizer.context_length} exceeds the model's "
                             f"{config.context_length}")
        self.config = config
        self.tokenizer = tokenizer
        self.visual = visual if visual is not None else build_backbone(config.backbone, width=config.width)
        self.image_projection = nn.Linear(self.visual.out_dim, config.embed_dim, bias=False)
        self.text = TextTransformer(len(tokenizer), config.context_length, config.text_width,
                                    config.text_layers, config.text_heads)
        self.text_projection = nn.Linear(config.text_width, config.embed_dim, bias=False)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        nn.init.normal_(self.image_projection.weight, std=self.visual.out_dim ** -0.5)
        nn.init.normal_(self.text_projection.weight, std=config.text_width ** -0.5)

    @property
    def logit_scale(self) -> torch.Tensor:
        """1/τ = exp(t), clamped at ``max_logit_scale``."""
        return self.log_logit_scale.exp().clamp(max=self.config.max_logit_scale)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clip the parameter itself after an optimiser step (as CLIP does), so it cannot drift
        into the flat region above the clamp where it would get no gradient."""
        self.log_logit_scale.clamp_(max=math.log(self.config.max_logit_scale))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Joint-space embeddings (not normalised) of images in [0, 1], N×3×H×W → N×embed_dim."""
        return self.image_projection(self.visual(images))

    def tokenize(self, texts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and ``<eot>`` positions on the model's device."""
        ids, eot = self.tokenizer.encode(texts)
        dev = self.log_logit_scale.device
        return ids.to(dev), eot.to(dev)

    def encode_text(self, texts: Sequence[str] | str | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Joint-space embeddings (not normalised) of captions, given as strings or as the
        ``(ids, eot_index)`` pair from :meth:`tokenize`."""
        ids, eot = texts if isinstance(texts, tuple) else self.tokenize(texts)
        if len(eot):  # the mask is causal, so the padding after the last <eot> can be skipped
            ids = ids[:, : int(eot.max()) + 1]
        return self.text_projection(self.text(ids, eot))

    def forward(self, images: torch.Tensor, ids: torch.Tensor, eot_index: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        image = F.normalize(self.encode_image(images), dim=-1)
        text = F.normalize(self.encode_text((ids, eot_index)), dim=-1)
        logits_per_image = self.logit_scale * image @ text.T
        return logits_per_image, logits_per_image.T

    def loss(self, images: torch.Tensor, ids: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """The symmetric contrastive loss for a batch of matching (image, caption) pairs."""
        return clip_loss(self.encode_image(images), self.encode_text((ids, eot_index)), self.logit_scale)


class ImageEmbedder(nn.Module):
    """Images in [0, 1] → L2-normalised joint-space embedding (shares CLIP's weights)."""

    def __init__(self, visual: nn.Module, projection: nn.Linear):
        super().__init__()
        self.visual = visual
        self.projection = projection
        self.out_dim = projection.out_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(self.visual(images)), dim=-1)


@torch.no_grad()
def class_embeddings(clip: CLIP, classes: Sequence[str], templates: Sequence[str] = HELD_OUT_TEMPLATES
                     ) -> torch.Tensor:
    """Prompt-ensembled class weights (C×D, unit rows): every prompt of a class is embedded and
    normalised, the class's prompts are averaged, and the mean is re-normalised."""
    was_training = clip.training
    clip.eval()
    try:
        return class_text_weights(clip.encode_text, classes, templates)
    finally:
        clip.train(was_training)


class ZeroShotClassifier(nn.Module):
    """A CLIP zero-shot head as a target: ``forward(images in [0, 1]) → logits`` (N×C) equal to
    ``logit_scale · cos(image embedding, class embedding)``.

    ``.clip`` is the whole model (so ``.clip.encode_text`` still works on a zoo entry),
    ``.encoder`` the normalised image embedding (same weights, not a copy, and not registered
    twice: the state dict holds ``clip.*`` and ``class_weights`` only). ``.classes`` and
    ``.templates`` record what the class weights were built from.
    """

    def __init__(self, clip: CLIP, weights: torch.Tensor, classes: Sequence[str], templates: Sequence[str]):
        super().__init__()
        d = clip.config.embed_dim
        if weights.ndim != 2 or weights.shape != (len(classes), d):
            raise ValueError(f"class weights must be {len(classes)}×{d}, got {tuple(weights.shape)}")
        self.clip = clip
        self.register_buffer("class_weights", weights.detach().clone())
        # A plain attribute, not a submodule: its parameters are clip's, registered once above.
        self.__dict__["encoder"] = ImageEmbedder(clip.visual, clip.image_projection)
        self.classes = tuple(classes)
        self.templates = tuple(templates)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.logit_scale * self.encoder(images) @ self.class_weights.T


def zero_shot_classifier(clip: CLIP, classes: Sequence[str], templates: Sequence[str] = HELD_OUT_TEMPLATES
                         ) -> ZeroShotClassifier:
    """Build the zero-shot target from ``clip`` (weights shared, not copied)."""
    return ZeroShotClassifier(clip, class_embeddings(clip, classes, templates), classes, templates)


# --------------------------------------------------------------------------- zoo entries

def clip_card(classifier: ZeroShotClassifier) -> dict:
    """The part of a model card that rebuilds ``classifier`` (``"builder": "clip"``)."""
    return {
        "builder": "clip",
        "config": asdict(classifier.clip.config),
        "tokenizer": classifier.clip.tokenizer.to_json(),
        "classes": list(classifier.classes),
        "zero_shot_templates": list(classifier.templates),
    }


def build_from_card(card: dict) -> ZeroShotClassifier:
    """Zoo builder: the un-initialised :class:`ZeroShotClassifier` described by ``card`` (its
    state dict — CLIP weights and class weights — is loaded by :func:`models.zoo.load`)."""
    for key in ("config", "tokenizer", "classes"):
        if key not in card:
            raise ValueError(f"a CLIP model card needs {key!r}")
    clip = CLIP(CLIPConfig.from_dict(card["config"]), WordTokenizer.from_json(card["tokenizer"]))
    weights = torch.zeros(len(card["classes"]), clip.config.embed_dim)
    return ZeroShotClassifier(clip, weights, card["classes"], card.get("zero_shot_templates") or HELD_OUT_TEMPLATES)


def load_clip(name_or_path: str | os.PathLike) -> tuple[CLIP, dict]:
    """``(clip, card)`` of a CLIP zoo entry (name or ``NAME.safetensors`` path), in eval mode."""
    from models.zoo import load

    classifier = load(name_or_path)
    if not isinstance(classifier, ZeroShotClassifier):
        raise ValueError(f"{name_or_path} is not a CLIP entry (builder {classifier.card.get('builder')!r})")
    return classifier.clip.eval(), classifier.card
