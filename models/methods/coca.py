"""CoCa as a training method of the one loop (``uap train coca``), and the captioner base
class it shares with ``uap train simvlm`` (:mod:`models.methods.simvlm`).

Each step captions every image of the batch exactly as ``uap train clip`` does (a random
training template filled with the image's class and measured colour/brightness words,
:mod:`models.captions`), applies word dropout to the decoder's *input* tokens (the targets
stay the true words, so ``<unk>`` is read but never written), augments the images with the
CIFAR crop-and-flip and returns the model's loss (:meth:`models.coca.Captioner.loss`):
``λ_con · contrastive + λ_cap · captioning`` for CoCa, the captioning loss alone for SimVLM.
The contrastive part contrasts the global batch under torchrun (:func:`models.clip_loss.clip_loss`
gathers the other ranks' embeddings); the captioning loss is a per-caption mean, so the
ranks' losses add up to the one-process loss.

The hold-out of ``val_size`` class-balanced images and the optimiser groups are CLIP's
(:class:`models.methods.clip.CLIPMethod`). Each epoch's validation metrics on the held-out
images: the likelihood classifier's accuracy (class prompts scored by the decoder) and, for
CoCa, the contrastive zero-shot accuracy with held-out templates. Captions, word dropout and
crops draw from torch's global generators, which the loop checkpoints, so resume is exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from models.augment import random_crop_flip
from models.captions import TRAIN_TEMPLATES, all_training_captions, image_attributes, make_captions
from models.clip_eval import zero_shot_accuracy
from models.captioner_targets import CaptionLikelihoodClassifier, coca_zero_shot_classifier
from models.coca import CaptionerConfig, Captioner
from models.methods.base import TrainingMethod, register_training_method
from models.methods.clip import CONTEXT_LENGTH, CLIPMethod
from models.tokenizer import WordTokenizer, mask_words, split_words
from uap.data import CIFAR10_CLASSES
from uap.options import Options, require

__all__ = ["CaptionerMethod", "CoCaMethod", "CoCaOptions"]


class CaptionerMethod(TrainingMethod):
    """What CoCa and SimVLM share: a :class:`~models.coca.Captioner` around the backbone,
    trained on generated captions. A subclass sets ``name``, ``Options`` and
    :meth:`captioner_config`, and the loss weights."""

    defaults = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.1, "warmup_epochs": 1.0}
    adam_betas, adam_eps = CLIPMethod.adam_betas, CLIPMethod.adam_eps
    #: λ_con and λ_cap of :meth:`models.coca.Captioner.loss` (a subclass may read them from its options)
    contrastive_weight: ClassVar[float] = 0.0
    caption_weight: ClassVar[float] = 1.0

    def __init__(self, backbone: nn.Module, options: Mapping[str, Any] | Options | None = None, **hparams: Any):
        """``backbone``: the image encoder, from :func:`models.backbones.build_backbone`."""
        super().__init__(backbone, options, **hparams)
        spec = getattr(backbone, "spec", None)
        if spec is None:
            raise ValueError(f"{self.name} needs a backbone from models.backbones.build_backbone (it records .spec)")
        self.classes = CIFAR10_CLASSES
        tokenizer = WordTokenizer.build(all_training_captions(self.classes), context_length=CONTEXT_LENGTH)
        config = CaptionerConfig(**spec, context_length=tokenizer.context_length, **self.captioner_config())
        self.captioner = Captioner(config, tokenizer, visual=backbone)
        # The backbone is registered once, as captioner.visual; .backbone is a plain alias.
        del self._modules["backbone"]
        self.__dict__["backbone"] = backbone
        class_ids = sorted({tokenizer.stoi[w] for c in self.classes for w in split_words(c)})
        self.register_buffer("class_token_ids", torch.tensor(class_ids), persistent=False)
        self.word_dropout, self.val_size = self.options.word_dropout, self.options.val_size
        self._val: tuple[torch.Tensor, torch.Tensor] | None = None

    def captioner_config(self) -> dict[str, Any]:
        """The :class:`~models.coca.CaptionerConfig` fields set by the options (not the backbone's)."""
        raise NotImplementedError

    # the same optimiser groups (no decay on embeddings, norms, biases, 1/τ) and hold-out as CLIP
    param_groups = CLIPMethod.param_groups
    prepare_data = CLIPMethod.prepare_data

    def training_step(self, x: torch.Tensor, y: torch.Tensor, step: int, max_steps: int) -> torch.Tensor:
        captions = make_captions(image_attributes(x), y, self.classes, TRAIN_TEMPLATES)
        ids, eot = self.captioner.tokenize(captions)
        inputs = mask_words(ids, eot, self.word_dropout, keep=torch.isin(ids, self.class_token_ids))
        return self.captioner.loss(random_crop_flip(x), inputs, eot, self.contrastive_weight,
                                   self.caption_weight, targets=ids)

    def after_step(self, step: int, max_steps: int) -> None:
        self.captioner.clamp_logit_scale_()

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """Likelihood-classifier accuracy on the held-out images (and CoCa's zero-shot accuracy and 1/τ)."""
        metrics: dict[str, float] = {}
        if self.captioner.config.contrastive:
            metrics["logit_scale"] = float(self.captioner.logit_scale.detach())
        if self._val is not None:
            x, y = self._val
            classifier = CaptionLikelihoodClassifier(self.captioner, self.classes)
            metrics["val_likelihood_accuracy"] = zero_shot_accuracy(classifier, x, y, batch_size=250)
            if self.captioner.config.contrastive:
                metrics["val_zero_shot_accuracy"] = zero_shot_accuracy(
                    coca_zero_shot_classifier(self.captioner, self.classes), x, y)
        return metrics


@dataclass(frozen=True)
class CoCaOptions(Options):
    """The hyper-parameters of :class:`CoCaMethod` (see there)."""

    embed_dim: int = 128
    text_width: int = 64
    text_heads: int = 4
    unimodal_layers: int = 2
    multimodal_layers: int = 2
    caption_queries: int = 16
    contrastive_weight: float = 1.0
    caption_weight: float = 2.0
    word_dropout: float = 0.05
    val_size: int = 1000

    def check(self) -> None:
        require(self.text_heads >= 1 and self.text_width % self.text_heads == 0,
                f"text_width ({self.text_width}) must be a multiple of text_heads ({self.text_heads})")
        require(self.unimodal_layers >= 1 and self.multimodal_layers >= 1,
                "unimodal_layers and multimodal_layers must be >= 1")
        require(self.caption_queries >= 1, f"caption_queries must be >= 1, got {self.caption_queries}")
        require(self.contrastive_weight >= 0 and self.caption_weight >= 0
                and self.contrastive_weight + self.caption_weight > 0,
                "contrastive_weight and caption_weight must be >= 0, not both 0")
        require(0.0 <= self.word_dropout < 1.0, f"word_dropout must be in [0, 1), got {self.word_dropout}")
        require(self.val_size >= 0, f"val_size must be >= 0, got {self.val_size}")


@register_training_method()
class CoCaMethod(CaptionerMethod):
    """CoCa (Yu et al. 2022) on generated CIFAR-10 captions: contrastive + captioning loss.

    Hyper-parameters (:class:`CoCaOptions`):
        embed_dim: size of the joint image–text space.
        text_width, text_heads: the text decoder.
        unimodal_layers: text-only layers (their ``<eot>`` output is the text embedding).
        multimodal_layers: layers with cross-attention to the image, before the token head.
        caption_queries: learned queries of the decoder's attentional pooler.
        contrastive_weight, caption_weight: λ_con and λ_cap (paper: 1 and 2).
        word_dropout: probability of replacing a non-class input word by ``<unk>``.
        val_size: class-balanced training images held out for validation (0: none).
    """

    name = "coca"
    Options = CoCaOptions
    zoo_builder = "coca"

    def __init__(self, backbone: nn.Module, options: Mapping[str, Any] | Options | None = None, **hparams: Any):
        super().__init__(backbone, options, **hparams)
        self.contrastive_weight = self.options.contrastive_weight
        self.caption_weight = self.options.caption_weight

    def captioner_config(self) -> dict[str, Any]:
        o = self.options
        return {"text_width": o.text_width, "text_heads": o.text_heads, "unimodal_layers": o.unimodal_layers,
                "multimodal_layers": o.multimodal_layers, "caption_queries": o.caption_queries,
                "contrastive": True, "embed_dim": o.embed_dim}
