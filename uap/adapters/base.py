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

__all__ = ["AdaptedClassifier", "INTERPOLATIONS", "fit_input_sizes"]

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
            at the native size). Architectures with global pooling take any size unchanged,
            unless :func:`fit_input_sizes` asks them to resize too (``resizes_inside``).
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
        self.own_size = (int(crop), int(crop))
        self.resizes_inside = bool(fixed_size)
        self.preprocessing = {"resize": int(resize), "crop": int(crop), "interpolation": interpolation,
                              "mean": [float(m) for m in mean], "std": [float(s) for s in std]}
        self.classes = tuple(classes) if classes else None
        self.source = dict(source or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resizes_inside and tuple(x.shape[-2:]) != self.own_size:
            x = F.interpolate(x, size=self.own_size, mode="bilinear", align_corners=False, antialias=False)
        return super().forward(x)

    def extra_repr(self) -> str:
        p = self.preprocessing
        return (f"resize={p['resize']}, crop={p['crop']}, interpolation={p['interpolation']}, "
                f"fixed_size={self.fixed_size is not None}, resizes_inside={self.resizes_inside}")


def fit_input_sizes(models: Sequence[nn.Module], crop: int) -> list[nn.Module]:
    """Make every adapted target whose own input size is not ``crop``×``crop`` resize inside.

    The resolution rule for targets of different input sizes sharing one image set (a transfer
    matrix of EfficientNet-Lite0/1/2 at 224/240/260): the images are prepared once, at the size
    :meth:`uap.preprocessing.Preprocessing.choose` picks, and each target that declares another
    size resizes them to its own (bilinear, as a fixed-size architecture already does), so every
    model sees the resolution its weights were trained at while one perturbation lives in one
    image space. Resizing is linear, so a target sees ``resize(x) + resize(v)``: its ℓ∞ norm never
    grows, and its ℓ2 norm scales by about the ratio of the sizes — the budget scaled to the
    model's input size. Targets without a declared size (the zoo's) are left alone.

    Returns the targets changed.
    """
    changed = []
    for model in models:
        if isinstance(model, AdaptedClassifier) and model.own_size != (int(crop), int(crop)) and not model.resizes_inside:
            model.resizes_inside = True
            changed.append(model)
    return changed
