"""The target every adapter returns: a library's network with its preprocessing around it.

Why: a library model expects normalised images of one preprocessing (resize, centre crop,
interpolation, mean/std); the engine hands every target images in ``[0, 1]``. The wrapper
keeps the normalisation inside the model (so perturbations live in pixel space), resizes
inside when the architecture takes only its native size (a ViT's patch grid) so that models
of different resolutions can share one image set, and exposes the resize/crop as
``preprocessing`` for :class:`uap.data.Preprocessing`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from uap.targets import Normalized

__all__ = ["AdaptedClassifier", "INTERPOLATIONS"]

#: interpolation names understood by the data loader (torchvision's InterpolationMode values)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


class AdaptedClassifier(Normalized):
    """``net(normalise(resize_if_needed(x)))`` for images ``x`` in ``[0, 1]``: a
    :class:`uap.targets.Normalized` that also knows the weights' preprocessing.

    Args:
        net: the library's network (takes normalised images, returns logits).
        mean, std: per-channel normalisation of the weights.
        resize, crop: the weights' evaluation preprocessing — shorter side resized to
            ``resize``, then a ``crop``×``crop`` centre crop (what the data loader should do).
        interpolation: of that resize (``"bilinear"``, ``"bicubic"`` or ``"nearest"``).
        fixed_size: the architecture only takes ``crop``×``crop`` inputs; other sizes are
            resized inside, bilinearly without antialiasing (differentiable, and the identity
            at the native size). Architectures with global pooling take any size unchanged.
        classes: class names in logit order, when the weights' metadata has them.
        source: how the model was made (spec, weights), for records.
    """

    def __init__(self, net: nn.Module, *, mean: Sequence[float], std: Sequence[float], resize: int, crop: int,
                 interpolation: str, fixed_size: bool, classes: Sequence[str] | None = None,
                 source: dict | None = None) -> None:
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        if len(mean) != 3 or len(std) != 3 or any(not s > 0 for s in std):
            raise ValueError(f"mean and std need three values each, std > 0; got {mean}, {std}")
        super().__init__(net, [float(m) for m in mean], [float(s) for s in std])
        self.fixed_size = (int(crop), int(crop)) if fixed_size else None
        self.preprocessing = {"resize": int(resize), "crop": int(crop), "interpolation": interpolation,
                              "mean": [float(m) for m in mean], "std": [float(s) for s in std]}
        self.classes = tuple(classes) if classes else None
        self.source = dict(source or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_size is not None and tuple(x.shape[-2:]) != self.fixed_size:
            x = F.interpolate(x, size=self.fixed_size, mode="bilinear", align_corners=False, antialias=False)
        return super().forward(x)

    def extra_repr(self) -> str:
        p = self.preprocessing
        return (f"resize={p['resize']}, crop={p['crop']}, interpolation={p['interpolation']}, "
                f"fixed_size={self.fixed_size is not None}")
