"""Measuring a CLIP model: zero-shot accuracy and image↔text retrieval recall@1.

- Zero-shot accuracy (Radford et al. 2021, §3.1): the :class:`~models.clip.ZeroShotClassifier`
  built from *held-out* prompt templates, scored against labels.
- Retrieval recall@1 on a caption set (paper §3.1.4 / Table 13 style): every image of a set is
  paired with one caption generated from it; image→text asks whether an image's nearest
  caption is its own, text→image whether a caption's nearest image is its own. CIFAR captions
  repeat (two grey trucks can get the same sentence), and identical sentences have identical
  embeddings, so a retrieved item counts as correct when *its caption text equals the query
  pair's caption text* — the only tie-free definition that does not depend on index order.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.captions import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, image_attributes, make_captions
from models.clip import CLIP, zero_shot_classifier

__all__ = ["predict_logits", "zero_shot_accuracy", "caption_set", "retrieval_recall_at_1", "evaluate_clip"]


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Logits of ``model`` on ``x`` in batches, in eval mode (mode restored afterwards)."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = torch.cat([model(part.to(dev)).cpu() for part in x.split(batch_size)])
    model.train(was_training)
    return out


def zero_shot_accuracy(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``classifier`` on ``(x, y)``, a fraction in [0, 1]."""
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need as many labels as images (got {len(x)} images, {len(y)} labels)")
    return (predict_logits(classifier, x, batch_size).argmax(1) == y).float().mean().item()


def caption_set(x: torch.Tensor, y: torch.Tensor, classes: Sequence[str], seed: int = 0,
                templates: Sequence[str] = TRAIN_TEMPLATES) -> list[str]:
    """One caption per image from its measured attributes (templates drawn with ``seed``)."""
    return make_captions(image_attributes(x), y, classes, templates, torch.Generator().manual_seed(seed))


@torch.no_grad()
def retrieval_recall_at_1(clip: nn.Module, x: torch.Tensor, captions: Sequence[str],
                          batch_size: int = 500) -> dict[str, float]:
    """``{"image_to_text": r, "text_to_image": r}`` recall@1 of paired ``(x[i], captions[i])``
    (a hit is a retrieved item whose caption text equals the query pair's; see module doc)."""
    if len(x) != len(captions) or len(x) == 0:
        raise ValueError(f"need one caption per image (got {len(x)} images, {len(captions)} captions)")
    was_training = clip.training
    clip.eval()
    dev = clip.log_logit_scale.device
    img = torch.cat([F.normalize(clip.encode_image(p.to(dev)), dim=-1) for p in x.split(batch_size)])
    txt = torch.cat([F.normalize(clip.encode_text(list(captions[i:i + batch_size])), dim=-1)
                     for i in range(0, len(captions), batch_size)])
    clip.train(was_training)
    sim = img @ txt.T
    index = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    text_ids = torch.tensor([index[c] for c in captions], device=sim.device)
    i2t = (text_ids[sim.argmax(1)] == text_ids).float().mean().item()
    t2i = (text_ids[sim.argmax(0)] == text_ids).float().mean().item()
    return {"image_to_text": i2t, "text_to_image": t2i}


@torch.no_grad()
def evaluate_clip(clip: CLIP, x: torch.Tensor, y: torch.Tensor, classes: Sequence[str],
                  templates: Sequence[str] = HELD_OUT_TEMPLATES, retrieval_images: int = 1000,
                  seed: int = 0) -> dict:
    """Model-card metrics: zero-shot accuracy on ``(x, y)`` with ``templates`` and retrieval
    recall@1 on the first ``retrieval_images`` of a seeded permutation with their captions."""
    acc = zero_shot_accuracy(zero_shot_classifier(clip, classes, templates), x, y)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:retrieval_images]
    recall = retrieval_recall_at_1(clip, x[idx], caption_set(x[idx], y[idx], classes, seed))
    return {"zero_shot_accuracy": acc, "retrieval_images": len(idx),
            "retrieval_captions": f"one caption per image from the training templates (seed {seed}); a hit is a "
                                  "retrieved item whose caption text equals the query pair's",
            "image_to_text_recall@1": recall["image_to_text"], "text_to_image_recall@1": recall["text_to_image"]}
