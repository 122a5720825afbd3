"""Zoo builders ``"coca"`` and ``"simvlm"``: a finished captioner run → a zoo entry.

The entry is the :class:`~models.captioner_targets.CaptionLikelihoodClassifier` (class prompts scored by
the decoder's log-likelihood), which the engine attacks like any classifier and which also
captions (``.generate``). The card records, on the test split: the likelihood classifier's
accuracy; how often the greedy caption names the image's class (``caption_class_rate``) and a
few sample captions; for CoCa also the contrastive zero-shot accuracy (held-out templates, as
CLIP's entry) and image↔text retrieval recall@1 (:func:`models.clip_eval.retrieval_recall_at_1`).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from models.captioner_targets import CaptionLikelihoodClassifier, build_from_card, captioner_card, coca_zero_shot_classifier
from models.coca import Captioner
from models.tokenizer import split_words
from models.zoo import ZooBuilder, register_zoo_builder

__all__ = ["CaptionerBuilder", "caption_class_rate"]

#: test images captioned for ``caption_class_rate`` (greedy decoding, one batched pass per 500)
CAPTIONED_IMAGES = 1000


@torch.no_grad()
def caption_class_rate(captioner: Captioner, x: torch.Tensor, y: torch.Tensor, classes: tuple[str, ...],
                       batch_size: int = 500) -> tuple[float, list[str]]:
    """``(fraction of greedy captions containing the image's class name, the captions)``."""
    was_training = captioner.training
    captioner.eval()
    try:
        captions = [c for part in x.split(batch_size) for c in captioner.generate(part.to(captioner.device))]
    finally:
        captioner.train(was_training)
    hits = [set(split_words(classes[int(label)])) <= set(split_words(c)) for c, label in zip(captions, y)]
    return sum(hits) / max(len(hits), 1), captions


@register_zoo_builder("simvlm")
@register_zoo_builder("coca")
class CaptionerBuilder(ZooBuilder):
    """The likelihood classifier of a CoCa or SimVLM run, with its caption metrics."""

    def rebuild(self, card: dict[str, Any]) -> nn.Module:
        return build_from_card(card)

    def summary(self, card: dict[str, Any]) -> str:
        line = f"likelihood accuracy {card['likelihood_acc']:.4f}, caption names the class {card['caption_class_rate']:.3f}"
        return line + (f", zero-shot {card['zero_shot_acc']:.4f}" if "zero_shot_acc" in card else "")

    def build(self, method, config, data, say: Callable[[str], None], probe_epochs: int) -> tuple[nn.Module, dict[str, Any]]:
        from models.captions import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES
        from models.clip_eval import caption_set, retrieval_recall_at_1, zero_shot_accuracy
        from models.zoo_build import _backbone_name, _cifar10, _custom

        (test_x, test_y), data_desc = _custom(data, ("test",)) if data is not None else _cifar10(("test",))
        captioner, classes = method.captioner.eval(), method.classes
        classifier = CaptionLikelihoodClassifier(captioner, classes).eval()
        say(f"likelihood classification and captioning of {config.method} on {len(test_x)} test images …")
        metrics: dict[str, Any] = {"likelihood_accuracy": zero_shot_accuracy(classifier, test_x, test_y, batch_size=250)}
        idx = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(config.seed))[:CAPTIONED_IMAGES]
        rate, captions = caption_class_rate(captioner, test_x[idx], test_y[idx], classes)
        metrics.update({"caption_class_rate": rate, "captioned_images": len(idx)})
        extra: dict[str, Any] = {}
        if captioner.config.contrastive:
            metrics["zero_shot_accuracy"] = zero_shot_accuracy(coca_zero_shot_classifier(captioner, classes), test_x, test_y)
            recall = retrieval_recall_at_1(captioner, test_x[idx], caption_set(test_x[idx], test_y[idx], classes, config.seed))
            metrics.update({"image_to_text_recall@1": recall["image_to_text"], "text_to_image_recall@1": recall["text_to_image"]})
            extra = {"zero_shot_acc": metrics["zero_shot_accuracy"], "zero_shot_templates": list(HELD_OUT_TEMPLATES)}
        say("; ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        paper = ("CoCa (Yu et al. 2022): contrastive + captioning loss" if captioner.config.contrastive
                 else "SimVLM-style prefix-LM captioner (Wang et al. 2022): captioning loss only")
        return classifier, {
            **captioner_card(classifier),
            "method": config.method,
            "description": f"{paper}, trained on CIFAR-10 with generated captions; logits are the mean log-likelihood "
                           "of each class's prompt captions given the image",
            "backbone": _backbone_name(config),
            "input": "images in [0, 1], N×3×32×32; CIFAR-10 normalisation is inside the model",
            "likelihood_acc": metrics["likelihood_accuracy"],
            "caption_class_rate": rate,
            "sample_captions": captions[:10],
            "train_templates": list(TRAIN_TEMPLATES),
            "metrics": {**metrics, "test_images": len(test_x), "split": "test"},
            "data": data_desc,
            **extra,
        }
