"""A SimVLM-style captioner as a training method of the one loop (``uap train simvlm``).

Wang et al., "SimVLM: Simple Visual Language Model Pretraining with Weak Supervision" (ICLR
2022): prefix language modelling with the image as the prefix. Here the prefix is the
backbone's image tokens, every decoder layer cross-attends to all of them, and the loss is
the teacher-forced captioning loss alone — a :class:`models.coca.Captioner` without
unimodal layers, attentional pooling or contrastive head. Captions, word dropout, augmentation,
hold-out and validation are those of :class:`models.methods.coca.CaptionerMethod`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models.methods.base import register_training_method
from models.methods.coca import CaptionerMethod
from uap.options import Options, require

__all__ = ["SimVLMMethod", "SimVLMOptions"]


@dataclass(frozen=True)
class SimVLMOptions(Options):
    """The hyper-parameters of :class:`SimVLMMethod` (see there)."""

    text_width: int = 64
    text_heads: int = 4
    decoder_layers: int = 4
    word_dropout: float = 0.05
    val_size: int = 1000

    def check(self) -> None:
        require(self.text_heads >= 1 and self.text_width % self.text_heads == 0,
                f"text_width ({self.text_width}) must be a multiple of text_heads ({self.text_heads})")
        require(self.decoder_layers >= 1, f"decoder_layers must be >= 1, got {self.decoder_layers}")
        require(0.0 <= self.word_dropout < 1.0, f"word_dropout must be in [0, 1), got {self.word_dropout}")
        require(self.val_size >= 0, f"val_size must be >= 0, got {self.val_size}")


@register_training_method()
class SimVLMMethod(CaptionerMethod):
    """Image-prefix captioner trained by the captioning loss alone.

    Hyper-parameters (:class:`SimVLMOptions`):
        text_width, text_heads: the decoder.
        decoder_layers: decoder layers (causal self-attention + cross-attention to every image token).
        word_dropout: probability of replacing a non-class input word by ``<unk>``.
        val_size: class-balanced training images held out for validation (0: none).
    """

    name = "simvlm"
    Options = SimVLMOptions
    zoo_builder = "simvlm"
    contrastive_weight = 0.0
    caption_weight = 1.0

    def captioner_config(self) -> dict[str, Any]:
        o = self.options
        return {"text_width": o.text_width, "text_heads": o.text_heads, "unimodal_layers": 0,
                "multimodal_layers": o.decoder_layers, "caption_queries": 0, "contrastive": False}
