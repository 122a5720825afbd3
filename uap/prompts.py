"""Zero-shot classification from class names: prompt templates and prompt-ensembled class weights.

A CLIP-style model (Radford et al. 2021, §3.1.4) becomes a classifier for any set of class
names: each name fills several prompt templates ("a blurry photo of a {c}."), every prompt is
embedded by the text tower and L2-normalised, a class's prompts are averaged and the mean is
normalised again. The logits of an image are then ``scale · cos(image embedding, class weight)``.

This is the one implementation of that rule: the zoo's CLIP (``models.clip``) and the
``open_clip:ARCH`` adapter (:mod:`uap.adapters.open_clip`) both build their zero-shot heads
with :func:`class_text_weights` and :data:`ZERO_SHOT_TEMPLATES`.
"""
from __future__ import annotations

import re
import string
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["ZERO_SHOT_TEMPLATES", "with_articles", "class_prompts", "class_text_weights"]

#: Class-only prompts for zero-shot classification (the zoo's CLIP never trains on them).
ZERO_SHOT_TEMPLATES = (
    "a blurry photo of a {c}.",
    "a black and white photo of the {c}.",
    "a low contrast photo of a {c}.",
    "a good photo of the {c}.",
    "a photo of the small {c}.",
    "a close-up photo of a {c}.",
    "a cropped photo of the {c}.",
    "an image of the {c}.",
    "a snapshot of a {c}.",
    "a pixelated picture of a {c}.",
)

_ARTICLE = re.compile(r"\ba (?=[aeiou])")


def with_articles(text: str) -> str:
    """Fix the indefinite article after filling a template: ``a orange cat`` → ``an orange cat``."""
    return _ARTICLE.sub("an ", text)


def class_prompts(classes: Sequence[str], templates: Sequence[str] = ZERO_SHOT_TEMPLATES) -> list[list[str]]:
    """``prompts[c][t]``: template ``t`` filled with class ``c`` (for prompt ensembling).

    A template has exactly one field, ``{c}``; any other field is a ``ValueError``.
    """
    for t in templates:
        fields = {name for _, name, _, _ in string.Formatter().parse(t) if name is not None}
        if fields != {"c"}:
            raise ValueError(f"a zero-shot template must have exactly the {{c}} field: {t!r}")
    return [[with_articles(t.format(c=cls)) for t in templates] for cls in classes]


@torch.no_grad()
def class_text_weights(encode_text: Callable[[list[str]], torch.Tensor], classes: Sequence[str],
                       templates: Sequence[str] = ZERO_SHOT_TEMPLATES, *, chunk: int | None = None) -> torch.Tensor:
    """Prompt-ensembled class weights (C×D, unit rows).

    ``encode_text(prompts)`` embeds a list of prompts (N×D); they are embedded ``chunk`` at a
    time (all at once by default), each normalised, averaged per class over the templates, and the mean re-normalised.
    """
    if not classes or not templates:
        raise ValueError("need at least one class and one template")
    flat = [p for per_class in class_prompts(classes, templates) for p in per_class]
    chunk = chunk or len(flat)
    emb = torch.cat([F.normalize(encode_text(flat[i:i + chunk]), dim=-1) for i in range(0, len(flat), chunk)])
    return F.normalize(emb.view(len(classes), len(templates), -1).mean(1), dim=-1)
