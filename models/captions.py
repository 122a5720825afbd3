"""Captions for CIFAR-10 that say more than the label.

A CLIP model (Radford et al. 2021) learns from (image, text) pairs; if every caption were
``"a photo of a {label}."`` the text tower would be a lookup table and contrastive training
would collapse into supervised learning with ten prototypes. Here each caption combines a
*training template* with words measured on the image itself, computed in one batched pass:

- ``colour`` — the most frequent colour name among the pixels of the central region (CIFAR
  objects are roughly centred), from a hue/saturation/value rule (black, white, gray, brown,
  red, orange, yellow, green, blue, purple, pink);
- ``background`` — the same, over the 4-pixel border;
- ``light`` — ``dark`` / ``dim`` / ``bright`` from mean luminance (ITU-R BT.601 weights),
  thresholds 0.36 and 0.52 (roughly the tertiles of CIFAR-10).

So text varies with the image, and two images of one class usually get different captions,
which gives the contrastive loss something to separate beyond the class.

Zero-shot evaluation uses :data:`HELD_OUT_TEMPLATES` — class-only prompts that never occur as
a training caption (checked by the tests), as CLIP evaluated with prompt ensembles (§3.1.4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from uap.prompts import ZERO_SHOT_TEMPLATES, class_prompts, with_articles

__all__ = [
    "COLOURS", "LIGHTS", "TRAIN_TEMPLATES", "HELD_OUT_TEMPLATES", "ImageAttributes",
    "colour_names", "image_attributes", "make_captions", "all_training_captions", "class_prompts",
    "with_articles",
]

COLOURS = ("black", "white", "gray", "brown", "red", "orange", "yellow", "green", "blue", "purple", "pink")
LIGHTS = ("dark", "dim", "bright")

# Hue boundaries in degrees for saturated pixels: [start, end) → colour name.
_HUES = ((0, 15, "red"), (15, 45, "orange"), (45, 70, "yellow"), (70, 165, "green"),
         (165, 255, "blue"), (255, 290, "purple"), (290, 340, "pink"), (340, 361, "red"))

# Fields: {c} class, {colour} object colour, {bg} background colour, {light} brightness word.
TRAIN_TEMPLATES = (
    "a photo of a {colour} {c}.",
    "a {light} photo of a {c}.",
    "a {colour} {c} on a {bg} background.",
    "a {c} in front of a {bg} background.",
    "a {light} image of a {colour} {c}.",
    "{colour} {c}.",
    "a picture of a {c}, mostly {colour}.",
    "an image showing a {c}.",
    "this is a {c}.",
    "a {c} against a {bg} backdrop.",
    "a small {light} picture of a {c} with a {bg} background.",
    "there is a {colour} {c} in this {light} photo.",
    "a {colour} and {bg} picture of a {c}.",
    "a {c}.",
)

# Class-only prompts kept out of training (zero-shot evaluation): the engine's zero-shot templates.
HELD_OUT_TEMPLATES = ZERO_SHOT_TEMPLATES

_CENTRE = slice(8, 24)  # the central 16×16 of a 32×32 image
_BORDER = 4


@dataclass(frozen=True)
class ImageAttributes:
    """Per-image words, as indices: ``colour``/``background`` into :data:`COLOURS`,
    ``light`` into :data:`LIGHTS` (all int64 tensors of length N)."""

    colour: torch.Tensor
    background: torch.Tensor
    light: torch.Tensor

    def __len__(self) -> int:
        return len(self.colour)

    def __getitem__(self, index) -> "ImageAttributes":
        return ImageAttributes(self.colour[index], self.background[index], self.light[index])


def colour_names(pixels: torch.Tensor) -> torch.Tensor:
    """Colour index (into :data:`COLOURS`) of every RGB pixel; ``pixels`` is ...×3 in [0, 1].

    Rule: value < 0.2 → black; saturation < 0.15 → white (value > 0.75) or gray; otherwise by
    hue, with dark (value < 0.55) red/orange/yellow called brown.
    """
    r, g, b = pixels.unbind(-1)
    v, _ = pixels.max(-1)
    m, _ = pixels.min(-1)
    c = v - m
    s = torch.where(v > 0, c / v.clamp_min(1e-12), torch.zeros_like(v))
    safe = c.clamp_min(1e-12)
    hue = torch.where(v == r, ((g - b) / safe) % 6, torch.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60
    out = torch.full(v.shape, COLOURS.index("gray"), dtype=torch.int64, device=pixels.device)
    for lo, hi, name in _HUES:
        out = torch.where((hue >= lo) & (hue < hi), torch.full_like(out, COLOURS.index(name)), out)
    warm = (hue < 70) | (hue >= 340)
    out = torch.where(warm & (v < 0.55), torch.full_like(out, COLOURS.index("brown")), out)
    achromatic = torch.where(v > 0.75, COLOURS.index("white"), COLOURS.index("gray"))
    out = torch.where(s < 0.15, torch.full_like(out, 0) + achromatic, out)
    return torch.where(v < 0.2, torch.full_like(out, COLOURS.index("black")), out)


def _mode_colour(pixels: torch.Tensor) -> torch.Tensor:
    """Most frequent colour index per image; ``pixels`` is N×P×3. Ties go to the lower index."""
    names = colour_names(pixels)
    counts = torch.zeros(len(names), len(COLOURS), dtype=torch.int64, device=pixels.device)
    counts.scatter_add_(1, names, torch.ones_like(names))
    return counts.argmax(1)


def image_attributes(x: torch.Tensor, chunk: int = 4096) -> ImageAttributes:
    """Measure colour, background colour and brightness of images ``x`` (N×3×32×32 in [0, 1]).

    Processed in chunks of ``chunk`` images so 50 000 images need little memory.
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images N×3×H×W, got shape {tuple(x.shape)}")
    if x.shape[-2:] != (32, 32):
        raise ValueError(f"caption attributes assume 32×32 images, got {tuple(x.shape[-2:])}")
    colour, background, light = [], [], []
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    border = torch.ones(32, 32, dtype=torch.bool, device=x.device)
    border[_BORDER:-_BORDER, _BORDER:-_BORDER] = False
    for part in x.split(chunk):
        hwc = part.permute(0, 2, 3, 1)
        colour.append(_mode_colour(hwc[:, _CENTRE, _CENTRE].reshape(len(part), -1, 3)))
        background.append(_mode_colour(hwc[:, border]))
        luma = (part * weights).sum(1).mean((1, 2))
        light.append(torch.bucketize(luma, torch.tensor([0.36, 0.52], dtype=x.dtype, device=x.device)))
    return ImageAttributes(torch.cat(colour), torch.cat(background), torch.cat(light))


def _fill(template: str, cls: str, colour: str = "", bg: str = "", light: str = "") -> str:
    return with_articles(template.format(c=cls, colour=colour, bg=bg, light=light))


def make_captions(
    attributes: ImageAttributes,
    labels: torch.Tensor,
    classes: Sequence[str],
    templates: Sequence[str] = TRAIN_TEMPLATES,
    generator: torch.Generator | None = None,
    template_index: torch.Tensor | None = None,
) -> list[str]:
    """One caption per image: a template (drawn uniformly with ``generator``, or given by
    ``template_index``) filled with the image's class and measured words."""
    n = len(labels)
    if len(attributes) != n:
        raise ValueError(f"{len(attributes)} attribute rows for {n} labels")
    if template_index is None:
        template_index = torch.randint(len(templates), (n,), generator=generator)
    elif len(template_index) != n:
        raise ValueError(f"template_index has {len(template_index)} entries for {n} images")
    rows = zip(template_index.tolist(), labels.tolist(), attributes.colour.tolist(),
               attributes.background.tolist(), attributes.light.tolist())
    return [_fill(templates[t], classes[y], COLOURS[c], COLOURS[b], LIGHTS[l]) for t, y, c, b, l in rows]


def all_training_captions(classes: Sequence[str], templates: Sequence[str] = TRAIN_TEMPLATES) -> list[str]:
    """Every caption the training templates can produce (used to build the vocabulary and to
    prove the held-out prompts never occur in training)."""
    out = set()
    for t in templates:
        for cls in classes:
            for c in COLOURS:
                for b in (COLOURS if "{bg}" in t else ("",)):
                    for light in (LIGHTS if "{light}" in t else ("",)):
                        out.add(_fill(t, cls, c, b, light))
    return sorted(out)
