"""A captioner as an attack target: the likelihood classifier every crafting method attacks,
CoCa's embedding zero-shot classifier, the caption-level UAP objective and the zoo card.

The models themselves are in :mod:`models.coca`.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.captions import HELD_OUT_TEMPLATES
from models.coca import CLASS_ONLY_TEMPLATES, Captioner, CaptionerConfig, caption_log_likelihood, caption_loss
from models.tokenizer import WordTokenizer
from uap.prompts import class_prompts, class_text_weights

__all__ = ["CaptionLikelihoodClassifier", "CoCaZeroShotClassifier", "coca_zero_shot_classifier",
           "caption_attack_loss", "captioner_card", "build_from_card"]


class CaptionLikelihoodClassifier(nn.Module):
    """A captioner as a classifier: ``forward(images in [0, 1]) → logits`` (N×C), where
    ``logits[n, c]`` is the mean over ``templates`` of log p(prompt(c, template) | image n).

    One decoder pass scores every prompt against every image: the prompts' unimodal features
    are computed once (they do not depend on the image), and each image's keys and values are
    shared by its C·P prompt rows. ``.generate`` captions images; ``.encoder`` maps images to
    features (CoCa: the normalised contrastive embedding; otherwise the backbone's pooled
    features). The state dict is the captioner's (``captioner.*``); the prompts are rebuilt
    from ``classes`` and ``templates``."""

    def __init__(self, captioner: Captioner, classes: Sequence[str], templates: Sequence[str] = CLASS_ONLY_TEMPLATES):
        super().__init__()
        self.captioner = captioner
        self.classes, self.templates = tuple(classes), tuple(templates)
        prompts = [p for per_class in class_prompts(self.classes, self.templates) for p in per_class]
        ids, ends = captioner.tokenizer.encode(prompts)
        unknown = captioner.tokenizer.unknown_words(prompts)
        if unknown:
            raise ValueError(f"prompt words outside the captioner's vocabulary: {unknown}")
        self.register_buffer("prompt_ids", ids[:, : int(ends.max()) + 1], persistent=False)
        self.register_buffer("prompt_ends", ends, persistent=False)
        encoder = _ContrastiveEmbedder(captioner) if captioner.config.contrastive else captioner.visual
        self.__dict__["encoder"] = encoder  # shares the captioner's weights; not registered twice

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        context, _ = self.captioner.image_context(images)
        n, rows = len(images), len(self.prompt_ids)
        decoder = self.captioner.decoder
        h = decoder.unimodal_features(self.prompt_ids[:, :-1])  # rows×(L−1)×width, image-free
        h = h.repeat(n, 1, 1)  # image-major: row i·rows + j is (image i, prompt j)
        logits = decoder.multimodal_logits(h, context, repeats=rows)
        ll = caption_log_likelihood(logits, self.prompt_ids.repeat(n, 1), self.prompt_ends.repeat(n))
        return ll.view(n, len(self.classes), len(self.templates)).mean(-1)

    def generate(self, images: torch.Tensor, max_tokens: int | None = None) -> list[str]:
        return self.captioner.generate(images, max_tokens)


class _ContrastiveEmbedder(nn.Module):
    """Images in [0, 1] → CoCa's L2-normalised contrastive image embedding."""

    def __init__(self, captioner: Captioner):
        super().__init__()
        self.__dict__["captioner"] = captioner  # a view: the weights stay registered once
        self.out_dim = captioner.config.embed_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.captioner.encode_image(images), dim=-1)


class CoCaZeroShotClassifier(nn.Module):
    """CoCa's contrastive zero-shot head as a target: ``logit_scale · cos(image, class)``, with
    prompt-ensembled class weights (:func:`uap.prompts.class_text_weights`), as CLIP's
    :class:`models.clip.ZeroShotClassifier`. ``.generate`` still captions."""

    def __init__(self, captioner: Captioner, weights: torch.Tensor, classes: Sequence[str], templates: Sequence[str]):
        super().__init__()
        captioner._require_contrastive()
        d = captioner.config.embed_dim
        if weights.shape != (len(classes), d):
            raise ValueError(f"class weights must be {len(classes)}×{d}, got {tuple(weights.shape)}")
        self.captioner = captioner
        self.register_buffer("class_weights", weights.detach().clone())
        self.__dict__["encoder"] = _ContrastiveEmbedder(captioner)
        self.classes, self.templates = tuple(classes), tuple(templates)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.captioner.logit_scale * self.encoder(images) @ self.class_weights.T

    def generate(self, images: torch.Tensor, max_tokens: int | None = None) -> list[str]:
        return self.captioner.generate(images, max_tokens)


def coca_zero_shot_classifier(captioner: Captioner, classes: Sequence[str],
                              templates: Sequence[str] = HELD_OUT_TEMPLATES) -> CoCaZeroShotClassifier:
    """CoCa's embedding zero-shot classifier (weights shared with ``captioner``, not copied)."""
    was_training = captioner.training
    captioner.eval()
    try:
        weights = class_text_weights(captioner.encode_text, classes, templates)
    finally:
        captioner.train(was_training)
    return CoCaZeroShotClassifier(captioner, weights, classes, templates)


# --------------------------------------------------------------------------- attack objective

def caption_attack_loss(captioner: Captioner | nn.Module, images: torch.Tensor, perturbation: torch.Tensor,
                        clean: tuple[torch.Tensor, torch.Tensor] | None = None,
                        max_tokens: int | None = None) -> torch.Tensor:
    """The label-free objective of a caption-level UAP: the captioning loss of the *clean*
    greedy captions under the perturbed images ``clamp(images + perturbation, 0, 1)``.
    Ascending it in ``perturbation`` makes the clean captions unlikely, which changes what
    the model writes. ``clean`` is ``(ids, ends)`` from :meth:`Captioner.generate_ids` on
    ``images`` (computed here when not given: pass it to reuse it across steps). ``captioner``
    may also be a classifier view of one (its ``.captioner``: a zoo entry as loaded)."""
    captioner = getattr(captioner, "captioner", captioner)
    if not isinstance(captioner, Captioner):
        raise ValueError(f"caption_attack_loss needs a Captioner (or a classifier around one), got {type(captioner).__name__}")
    ids, ends = clean if clean is not None else captioner.generate_ids(images, max_tokens)
    if len(ids) != len(images):
        raise ValueError(f"{len(ids)} clean captions for {len(images)} images")
    logits, _, _ = captioner((images + perturbation).clamp(0, 1), ids, ends)
    return caption_loss(logits, ids[:, : logits.shape[1] + 1], ends)


# --------------------------------------------------------------------------- zoo cards

def captioner_card(classifier: CaptionLikelihoodClassifier) -> dict:
    """The part of a model card that rebuilds ``classifier`` (``"builder"``: ``"coca"`` for a
    contrastive captioner, else ``"simvlm"``)."""
    cap = classifier.captioner
    return {
        "builder": "coca" if cap.config.contrastive else "simvlm",
        "config": asdict(cap.config),
        "tokenizer": cap.tokenizer.to_json(),
        "classes": list(classifier.classes),
        "likelihood_templates": list(classifier.templates),
    }


def build_from_card(card: dict) -> CaptionLikelihoodClassifier:
    """The un-initialised likelihood classifier a card describes (weights loaded by :func:`models.zoo.load`)."""
    for key in ("config", "tokenizer", "classes"):
        if key not in card:
            raise ValueError(f"a captioner model card needs {key!r}")
    cap = Captioner(CaptionerConfig.from_dict(card["config"]), WordTokenizer.from_json(card["tokenizer"]))
    return CaptionLikelihoodClassifier(cap, card["classes"], card.get("likelihood_templates") or CLASS_ONLY_TEMPLATES)
