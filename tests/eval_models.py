"""Tiny, seeded target models for the evaluation/transfer tests (no zoo needed).

All take images in [0, 1] of shape N×3×8×8 and return logits; the encoder ones expose
``.encoder`` like the zoo's classifiers do. They are small enough that crafting a UAP on a
handful of images takes well under a second.
"""
from __future__ import annotations

import torch
from torch import nn

IMAGE_SHAPE = (3, 8, 8)
NUM_CLASSES = 4


def _seeded(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / max(1, p.shape[-1]) ** 0.5))
    return module.eval()


class LinearTarget(nn.Module):
    """``W (x - 0.5) + b``: a linear classifier (normalisation inside, as the contract says)."""

    def __init__(self, seed: int = 0, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, num_classes)
        _seeded(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((x - 0.5).flatten(1))


class TinyEncoder(nn.Module):
    """flatten → linear → tanh: images in [0, 1] → 16-d features (an MLP keeps DeepFool's
    batched backward passes cheap on a busy CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(2.0 * self.fc((x - 0.5).flatten(1)))


class EncoderTarget(nn.Module):
    """A linear probe on :class:`TinyEncoder`; ``forward`` calls ``self.encoder``."""

    def __init__(self, seed: int = 1, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.encoder = TinyEncoder()
        self.head = nn.Linear(16, num_classes)
        _seeded(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class DetachedEncoderTarget(EncoderTarget):
    """Exposes ``.encoder`` but classifies through a copy of it, so a forward hook on
    ``.encoder`` never fires: evaluation must fall back to calling the encoder itself."""

    def __init__(self, seed: int = 2, num_classes: int = NUM_CLASSES):
        super().__init__(seed, num_classes)
        self.inner = TinyEncoder()
        _seeded(self.inner, seed + 100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.inner(x))


def linear_target() -> nn.Module:
    """Factory for ``--model tests.eval_models:linear_target``."""
    return LinearTarget(seed=0)


def encoder_target() -> nn.Module:
    """Factory for ``--model tests.eval_models:encoder_target``."""
    return EncoderTarget(seed=1)


def images(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random images in [0, 1] (3×8×8) and labels in ``range(NUM_CLASSES)``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *IMAGE_SHAPE), generator=gen)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    return x, y
