"""Small models for the engine's tests (usable before the zoo exists).

- :func:`tiny_cnn` — a factory for ``uap craft --model tests.tiny_models:tiny_cnn`` (run from
  the repository root);
- :func:`trained_tiny_cnn` — the same network trained for a few seconds on 2 000 CIFAR-10
  images, cached per process so every test file shares one training run;
- :class:`Affine` — ``f(x) = W·flatten(x) + b``, whose DeepFool answer has a closed form;
- :class:`BNNet` (:func:`bn_net` for the CLI) — convolutions and a linear layer each followed by
  batch norm with non-trivial statistics, for batch-norm folding.
"""
from __future__ import annotations

import functools

import torch
from torch import nn


class TinyCNN(nn.Module):
    """Two conv blocks and a linear head; takes [0, 1] images, returns 10 logits."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * width * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x - 0.5).flatten(1))


def tiny_cnn() -> nn.Module:
    """Factory for the CLI (``--model tests.tiny_models:tiny_cnn``), seeded so it is reproducible."""
    torch.manual_seed(0)
    return TinyCNN()


class Affine(nn.Module):
    """``f(x) = W·flatten(x) + b`` — a linear classifier with a closed-form DeepFool."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias


@functools.lru_cache(maxsize=1)
def cifar_subset(n: int = 2000, split: str = "train", seed: int = 0):
    """A class-balanced CIFAR-10 subset (cached per process)."""
    from uap import data

    return data.load("cifar10", split=split, n=n, seed=seed)


@functools.lru_cache(maxsize=1)
def trained_tiny_cnn(epochs: int = 4) -> nn.Module:
    """:class:`TinyCNN` trained on 2 000 CIFAR-10 training images (~40 % test accuracy)."""
    x, y, _ = cifar_subset()
    torch.manual_seed(0)
    return fit(TinyCNN(), x, y, lr=2e-3, epochs=epochs, batch_size=64)


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, epochs: int, batch_size: int) -> nn.Module:
    """Train ``model`` with Adam and cross-entropy (seeded order), then freeze it in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class TinyMLP(nn.Module):
    """A one-hidden-layer ReLU network on small images: non-linear, yet fast enough for
    reference loops that call DeepFool once per image."""

    def __init__(self, in_shape: tuple[int, int, int] = (3, 8, 8), hidden: int = 32, num_classes: int = 5):
        super().__init__()
        c, h, w = in_shape
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x - 0.5)


def tiny_mlp(seed: int = 0, in_shape: tuple[int, int, int] = (3, 8, 8)) -> nn.Module:
    """A seeded :class:`TinyMLP` in eval mode with frozen parameters."""
    torch.manual_seed(seed)
    model = TinyMLP(in_shape).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tiny_linear() -> nn.Module:
    """Factory for CLI tests: a seeded linear classifier on 3×32×32 images (DeepFool needs
    one or two steps on it, so crafting is fast even on a busy machine)."""
    g = torch.Generator().manual_seed(0)
    return Affine(0.05 * torch.randn(10, 3 * 32 * 32, generator=g), 0.1 * torch.randn(10, generator=g))


# --------------------------------------------------------------------------- batch norm

def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus a conv-BN shortcut, as in a ResNet."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout)
        self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.short(x))


class BNNet(nn.Module):
    """Conv blocks with batch norm and a linear + BatchNorm1d head: 5 foldable BatchNorm layers.
    Takes ``size``×``size`` images."""

    def __init__(self, size: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Block(8, 16)
        self.fc, self.bn_fc, self.out = nn.Linear(16 * size * size, 12), nn.BatchNorm1d(12), nn.Linear(12, 10)
        randomise_batchnorm(self)

    def forward(self, x):
        h = self.block(self.stem(x - 0.5)).flatten(1)
        return self.out(torch.relu(self.bn_fc(self.fc(h))))


def bn_net() -> nn.Module:
    """Factory for the CLI (``--model tests.tiny_models:bn_net``): :class:`BNNet` for 32×32 images, seeded."""
    return BNNet(size=32)


def tiny_cnn_failing_on_rank_1() -> nn.Module:
    """``tiny_cnn`` for every process but torchrun's rank 1, which refuses with a ValueError
    (a rank that fails while the others go on, for the distributed command-line tests)."""
    import os

    if os.environ.get("RANK") == "1":
        raise ValueError("this factory refuses to build on rank 1")
    return tiny_cnn()
