"""Test-time augmentation as a classifier: logits averaged over mirrored and translated views.

airbench's evaluation (Jordan 2024, §3.7): level 1 averages the logits of the image and its
horizontal mirror; level 2 averages that pair-mean with the pair-means of two views shifted by
one pixel diagonally (up-left and down-right, reflection padding), with weights 1/2, 1/4, 1/4.

Wrapping a classifier in :class:`FlipTranslateTTA` makes the augmented ensemble *the* model
(images in [0, 1] → logits), so an attack on it attacks the ensemble — which is what a model
card must say when it ships one. ``.encoder`` is the wrapped classifier's, un-augmented.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FlipTranslateTTA", "TTA_LEVELS"]

TTA_LEVELS = (0, 1, 2)


class FlipTranslateTTA(nn.Module):
    """``level`` 0: the classifier itself; 1: mean over {x, mirror(x)}; 2: airbench's
    ½·mirror-mean(x) + ¼·mirror-mean(x shifted by (−1, −1)) + ¼·mirror-mean(x shifted by (+1, +1))."""

    def __init__(self, classifier: nn.Module, level: int = 2):
        super().__init__()
        if level not in TTA_LEVELS:
            raise ValueError(f"TTA level must be one of {TTA_LEVELS}, got {level!r}")
        self.classifier, self.level = classifier, level

    @property
    def encoder(self) -> nn.Module:
        return self.classifier.encoder

    def _mirror_mean(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.classifier(x) + self.classifier(x.flip(-1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.level == 0:
            return self.classifier(x)
        logits = self._mirror_mean(x)
        if self.level == 1:
            return logits
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = (padded[..., :h, :w], padded[..., 2:h + 2, 2:w + 2])
        return 0.5 * logits + 0.25 * (self._mirror_mean(shifted[0]) + self._mirror_mean(shifted[1]))
