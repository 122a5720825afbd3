"""CLIP as a training method of the one loop (``uap train clip``).

Each step writes a fresh caption for every image of the batch — a random training template
filled with the image's class and its measured colour/brightness words
(:mod:`models.captions`) — replaces a few non-class words by ``<unk>`` (word dropout, which
trains the embedding that unseen words of held-out zero-shot prompts become), augments the
images with the CIFAR crop-and-flip (no colour jitter: it would make the colour words false)
and returns the symmetric contrastive loss. After each optimiser step 1/τ is clipped at its
maximum, as in CLIP.

``val_size`` class-balanced training images are held out (:meth:`CLIPMethod.prepare_data`);
their zero-shot accuracy with the held-out templates is each epoch's validation metric. No
model selection is made: the final epoch's weights are the result.

Captions, word dropout and crops draw from torch's global generators, which the loop
checkpoints, so a resumed run is exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from models.augment import random_crop_flip
from models.captions import TRAIN_TEMPLATES, all_training_captions, image_attributes, make_captions
from models.clip import CLIP, CLIPConfig, zero_shot_classifier
from models.clip_eval import zero_shot_accuracy
from models.methods.base import TrainingMethod, register_training_method
from models.tokenizer import WordTokenizer, mask_words, split_words
from uap.data import CIFAR10_CLASSES, balanced_subset
from uap.options import Options, require

__all__ = ["CLIPMethod", "CLIPOptions", "CONTEXT_LENGTH"]

#: Tokens per caption (``<sot>`` and ``<eot>`` included); the longest training caption fits.
CONTEXT_LENGTH = 16


@dataclass(frozen=True)
class CLIPOptions(Options):
    """The hyper-parameters of :class:`CLIPMethod` (see there)."""

    embed_dim: int = 128
    text_width: int = 64
    text_layers: int = 3
    text_heads: int = 4
    word_dropout: float = 0.05
    val_size: int = 1000

    def check(self) -> None:
        require(0.0 <= self.word_dropout < 1.0, f"word_dropout must be in [0, 1), got {self.word_dropout}")
        require(self.val_size >= 0, f"val_size must be >= 0, got {self.val_size}")
        require(self.text_heads >= 1 and self.text_width % self.text_heads == 0,
                f"text_width ({self.text_width}) must be a multiple of text_heads ({self.text_heads})")


@register_training_method()
class CLIPMethod(TrainingMethod):
    """Image encoder (the backbone) + text transformer trained with CLIP's contrastive loss
    on generated CIFAR-10 captions.

    Hyper-parameters (:class:`CLIPOptions`):
        embed_dim: size of the joint image–text space.
        text_width, text_layers, text_heads: the text transformer.
        word_dropout: probability of replacing a non-class caption word by ``<unk>``.
        val_size: class-balanced training images held out for the per-epoch zero-shot
            validation (0: none).
    """

    name = "clip"
    Options = CLIPOptions
    defaults = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.1, "warmup_epochs": 1.0}
    zoo_builder = "clip"
    #: AdamW's moment decay and epsilon of CLIP's training recipe (other optimisers ignore them).
    adam_betas = (0.9, 0.98)
    adam_eps = 1e-6

    def __init__(self, backbone: nn.Module, options: Mapping[str, Any] | Options | None = None, **hparams: Any):
        """``backbone``: the image encoder, from :func:`models.backbones.build_backbone`."""
        super().__init__(backbone, options, **hparams)
        o = self.options
        spec = getattr(backbone, "spec", None)
        if spec is None:
            raise ValueError("CLIP needs a backbone from models.backbones.build_backbone (it records .spec)")
        self.classes = CIFAR10_CLASSES
        tokenizer = WordTokenizer.build(all_training_captions(self.classes), context_length=CONTEXT_LENGTH)
        config = CLIPConfig(**spec, embed_dim=o.embed_dim, context_length=tokenizer.context_length,
                            text_width=o.text_width, text_layers=o.text_layers, text_heads=o.text_heads)
        self.clip = CLIP(config, tokenizer, visual=backbone)
        # The backbone is registered once, as clip.visual (the layout of a CLIP zoo entry);
        # .backbone stays a plain attribute pointing at the same module.
        del self._modules["backbone"]
        self.__dict__["backbone"] = backbone
        class_ids = sorted({tokenizer.stoi[w] for c in self.classes for w in split_words(c)})
        self.register_buffer("class_token_ids", torch.tensor(class_ids), persistent=False)
        self.word_dropout, self.val_size = o.word_dropout, o.val_size
        self._val: tuple[torch.Tensor, torch.Tensor] | None = None

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Weight decay on weight matrices and kernels only; none on biases, norms, embeddings
        and the logit scale (as in CLIP's training code); CLIP's AdamW betas and epsilon."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            skip = p.ndim < 2 or "embedding" in name or name.endswith("log_logit_scale")
            (no_decay if skip else decay).append(p)
        opts = {"betas": self.adam_betas, "eps": self.adam_eps}
        return [{"params": decay, "weight_decay": weight_decay, **opts},
                {"params": no_decay, "weight_decay": 0.0, **opts}]

    def prepare_data(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hold out ``val_size`` class-balanced images (the same ones for every run seed) for
        :meth:`on_epoch_end`; train on the rest."""
        if self.val_size == 0:
            self._val = None
            return x, y
        if self.val_size >= len(x):
            raise ValueError(f"val_size ({self.val_size}) must be smaller than the {len(x)} training images")
        held = torch.as_tensor(balanced_subset(y.cpu().numpy(), self.val_size, seed=0))
        keep = torch.ones(len(x), dtype=torch.bool)
        keep[held] = False
        self._val = (x[held.to(x.device)].cpu(), y[held.to(y.device)].cpu())
        keep = keep.to(x.device)
        return x[keep], y[keep]

    def training_step(self, x: torch.Tensor, y: torch.Tensor, step: int, max_steps: int) -> torch.Tensor:
        captions = make_captions(image_attributes(x), y, self.classes, TRAIN_TEMPLATES)
        ids, eot = self.clip.tokenize(captions)
        ids = mask_words(ids, eot, self.word_dropout, keep=torch.isin(ids, self.class_token_ids))
        return self.clip.loss(random_crop_flip(x), ids, eot)

    def after_step(self, step: int, max_steps: int) -> None:
        self.clip.clamp_logit_scale_()

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """Zero-shot accuracy (held-out templates) on the held-out images, and 1/τ."""
        metrics = {"logit_scale": float(self.clip.logit_scale.detach())}
        if self._val is not None:
            x, y = self._val
            metrics["val_zero_shot_accuracy"] = zero_shot_accuracy(zero_shot_classifier(self.clip, self.classes), x, y)
        return metrics
