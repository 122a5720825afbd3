"""Batched image augmentations on tensors in ``[0, 1]`` (N×3×H×W), fast on CPU.

Every function draws independent random parameters per image but transforms the whole batch
with a handful of tensor operations — no per-image Python loop. Geometric transforms
(random resized crop, padded crop, horizontal flip) become one affine sampling grid per image
and a single :func:`torch.nn.functional.grid_sample` call; colour transforms are per-image
scalars broadcast over the batch.

The recipes follow the papers: SimCLR (Chen et al. 2020, App. A: crop, flip, colour jitter
with p=0.8, grayscale with p=0.2), MoCo v2 / BYOL use the same family, and DINO's multi-crop
(Caron et al. 2021) adds small local crops seen only by the student.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "random_resized_crop", "random_crop_flip", "random_translate", "color_jitter", "random_grayscale",
    "SSLAugment", "MultiCrop", "grayscale",
]

_LUMA = (0.299, 0.587, 0.114)


def _check_images(x: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images N×3×H×W, got shape {tuple(x.shape)}")


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


def _sample_affine(x: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio`` (log-uniform),
    resize it to ``size``×``size`` and mirror it horizontally with probability ``flip_p``.

    Like torchvision's ``RandomResizedCrop`` but batched; crops that would leave the image are
    shrunk to fit (torchvision retries instead), so every crop lies inside the image.
    """
    _check_images(x)
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
    n, dev = x.shape[0], x.device
    area = _uniform(n, scale[0], scale[1], generator, dev)
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator, dev)
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # fractions of the image width / height
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(n, generator=generator, device=dev) * 2 - 1) * (1 - w)  # centre in [-1, 1] coords
    cy = (torch.rand(n, generator=generator, device=dev) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(n, generator=generator, device=dev) < flip_p, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    return _sample_affine(x, theta, size)


def random_crop_flip(x: torch.Tensor, padding: int = 4, flip_p: float = 0.5,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """The classic CIFAR augmentation: zero-pad by ``padding``, take a random crop of the
    original size (integer shifts, so pixels are copied exactly) and flip with ``flip_p``."""
    _check_images(x)
    n, _, hgt, wid = x.shape
    dev = x.device
    dx = torch.randint(-padding, padding + 1, (n,), generator=generator, device=dev).float()
    dy = torch.randint(-padding, padding + 1, (n,), generator=generator, device=dev).float()
    flip = torch.where(torch.rand(n, generator=generator, device=dev) < flip_p, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = flip, 2 * dx / wid
    theta[:, 1, 1], theta[:, 1, 2] = 1.0, 2 * dy / hgt
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def random_translate(x: torch.Tensor, shift: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by an independent integer offset in ``[-shift, shift]`` along each axis,
    filling the border by reflection (``F.pad(..., mode="reflect")``): airbench's translate
    augmentation. Pixels are copied exactly (two gathers, no interpolation)."""
    _check_images(x)
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    if shift == 0:
        return x
    n, c, hgt, wid = x.shape
    dev = x.device
    padded = F.pad(x, (shift,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator, device=dev)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator, device=dev)
    rows = (dy[:, None] + torch.arange(hgt, device=dev))[:, None, :, None].expand(n, c, hgt, wid + 2 * shift)
    cols = (dx[:, None] + torch.arange(wid, device=dev))[:, None, None, :].expand(n, c, hgt, wid)
    return padded.gather(2, rows).gather(3, cols)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, repeated over 3 channels."""
    w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True).expand_as(x)


def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate chroma by ``angle`` radians in YIQ space (a linear stand-in for an HSV hue shift)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                          device=x.device, dtype=x.dtype)
    to_rgb = torch.linalg.inv(to_yiq)
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(len(angle), 3, 3, device=x.device, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    m = to_rgb @ rot @ to_yiq  # N×3×3, one colour matrix per image
    return torch.einsum("nij,njhw->nihw", m, x)


def color_jitter(
    x: torch.Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    p: float = 0.8,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """With probability ``p`` per image, scale brightness, contrast and saturation by factors
    drawn from ``[1 - s, 1 + s]`` and shift hue by up to ``hue`` of a full turn; result clipped
    to [0, 1]. (Applied in a fixed order; torchvision shuffles it — immaterial for SSL.)"""
    _check_images(x)
    n, dev = x.shape[0], x.device
    apply = (torch.rand(n, generator=generator, device=dev) < p).view(n, 1, 1, 1)

    def factor(s: float) -> torch.Tensor:
        return _uniform(n, max(0.0, 1 - s), 1 + s, generator, dev).view(n, 1, 1, 1)

    out = x * factor(brightness)
    mean = grayscale(out).mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * factor(contrast) + mean
    gray = grayscale(out)
    out = (out - gray) * factor(saturation) + gray
    if hue > 0:
        out = _rotate_hue(out, _uniform(n, -hue, hue, generator, dev) * 2 * math.pi)
    return torch.where(apply, out.clamp_(0, 1), x)


def random_grayscale(x: torch.Tensor, p: float = 0.2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Convert each image to grayscale with probability ``p``."""
    _check_images(x)
    apply = (torch.rand(x.shape[0], generator=generator, device=x.device) < p).view(-1, 1, 1, 1)
    return torch.where(apply, grayscale(x), x)


@dataclass
class SSLAugment:
    """One SimCLR-style view: random resized crop + flip, colour jitter, grayscale.

    Defaults are SimCLR's CIFAR settings (crop scale (0.2, 1) as in MoCo v2's CIFAR recipe,
    jitter strength 0.5 → (0.4, 0.4, 0.4, 0.1), p_jitter 0.8, p_gray 0.2). Blur is omitted for
    32×32 images, as in SimCLR's CIFAR experiments.
    """

    size: int = 32
    scale: tuple[float, float] = (0.2, 1.0)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        v = random_resized_crop(x, self.size, self.scale, generator=generator)
        v = color_jitter(v, *self.jitter, p=self.jitter_p, generator=generator)
        return random_grayscale(v, self.gray_p, generator=generator)


@dataclass
class MultiCrop:
    """DINO multi-crop: 2 global views (large crops, full resolution) and ``n_local`` small
    local views (small crops at ``local_size``). The teacher sees only the global views."""

    global_size: int = 32
    local_size: int = 16
    n_local: int = 4
    global_scale: tuple[float, float] = (0.35, 1.0)
    local_scale: tuple[float, float] = (0.1, 0.35)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        g = SSLAugment(self.global_size, self.global_scale)
        loc = SSLAugment(self.local_size, self.local_scale)
        return [g(x, generator), g(x, generator)] + [loc(x, generator) for _ in range(self.n_local)]
