"""Tiny models and synthetic data for the tests of ``uap.methods`` (no CIFAR-10, no zoo).

- :class:`Linear2D` — a binary linear classifier on 2-pixel "images" (N×2×1×1), where the
  best universal perturbation has a closed form, and :func:`two_class_points`, its data;
- :func:`blobs` — a 10-class synthetic image set (3×8×8): each class is a fixed random
  pattern plus noise, so a small network learns it to ~100 % in about a second;
- :func:`trained_mlp` — that small network, trained once per process;
- :class:`TinyEncoderModel` — a conv encoder exposed as ``.encoder`` with a linear head, the
  shape of the zoo's self-supervised targets.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from tests.tiny_models import fit


class Linear2D(nn.Module):
    """Logits ``[0, w·x + b]`` on inputs of shape N×2×1×1: predicts 1 when ``w·x + b > 0``."""

    def __init__(self, w: tuple[float, float], b: float):
        super().__init__()
        self.register_buffer("w", torch.tensor(w, dtype=torch.float32))
        self.register_buffer("b", torch.tensor(float(b)))

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w + self.b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.score(x)
        return torch.stack([torch.zeros_like(s), s], dim=1)


def two_class_points(w: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """40 points around (0.5, 0.5): 30 with score s ∈ (0, 0.22] (class 1), 10 with s < 0.

    ``x = c + a·u + t·n`` with ``u = w/‖w‖``, ``n ⟂ u``; the score is ``s = ‖w‖·a``. Returns the
    points (N×2×1×1) and ``w``.
    """
    w = torch.tensor(w)
    u, n = w / w.norm(), torch.tensor([-float(w[1]), float(w[0])]) / float(w.norm())
    a = torch.cat([torch.linspace(0.005, 0.1, 30), -torch.linspace(0.005, 0.1, 10)])
    t = torch.linspace(-0.15, 0.15, 40)[torch.randperm(40, generator=torch.Generator().manual_seed(0))]
    x = 0.5 + a[:, None] * u + t[:, None] * n
    return x.view(40, 2, 1, 1), w


@functools.lru_cache(maxsize=1)
def _patterns(num_classes: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.25 + 0.5 * torch.rand(num_classes, 3, 8, 8, generator=g)


def blobs(n: int, *, seed: int = 0, noise: float = 0.12) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (N×3×8×8 in [0, 1]) and labels: class pattern + Gaussian noise, balanced."""
    g = torch.Generator().manual_seed(1000 + seed)
    y = torch.arange(n) % 10
    x = _patterns()[y] + noise * torch.randn(n, 3, 8, 8, generator=g)
    return x.clamp(0, 1), y


class MLP(nn.Module):
    """``Linear → ReLU → Linear`` on flattened 3×8×8 images."""

    def __init__(self, hidden: int = 64, num_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@functools.lru_cache(maxsize=1)
def trained_mlp() -> nn.Module:
    """:class:`MLP` trained on 1 000 :func:`blobs` images (a few hundred Adam steps)."""
    torch.manual_seed(0)
    x, y = blobs(1000)
    return fit(MLP(), x, y, lr=3e-3, epochs=5, batch_size=50)


class TinyEncoderModel(nn.Module):
    """A random conv encoder (images in [0, 1] → 32-d features) with a linear head."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(32, 10)
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class AffineClassifier(nn.Module):
    """``z = W·flatten(x) + b`` — a K-class linear classifier (closed-form DeepFool steps)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias


def random_affine(num_classes: int = 4, shape: tuple[int, ...] = (3, 4, 4), seed: int = 0) -> AffineClassifier:
    """An :class:`AffineClassifier` with Gaussian weights, for images of ``shape``."""
    g = torch.Generator().manual_seed(seed)
    d = int(torch.tensor(shape).prod())
    return AffineClassifier(0.5 * torch.randn(num_classes, d, generator=g), 0.3 * torch.randn(num_classes, generator=g))
