"""A CIFAR ResNet as public repositories ship them, small enough for the tests.

The layout of the common CIFAR-10 ResNet-20/56 code: a 3×3 stem with batch norm, three stages
of basic blocks (16, 32, 64 channels there; 8, 16, 32 here, one block each), global average
pooling and a linear head, built by a ``module:factory`` function and trained on images
normalised with ImageNet's mean/std — so the model expects normalised input and is
given it through ``?mean=…&std=…`` or ``--mean/--std``. :func:`trained_weights` trains it for a
few seconds on 2 000 CIFAR-10 images and saves a plain state dict (``torch.save``).
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: The normalisation as a spec's query and as the single-model commands' flags.
QUERY = "mean=0.485/0.456/0.406&std=0.229/0.224/0.225"
FLAGS = ("--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem, three stages, average pooling, linear: takes *normalised* 32×32 images."""

    def __init__(self, widths: tuple[int, int, int] = (8, 16, 32), num_classes: int = 10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0])
        self.layer1 = BasicBlock(widths[0], widths[0], 1)
        self.layer2 = BasicBlock(widths[0], widths[1], 2)
        self.layer3 = BasicBlock(widths[1], widths[2], 2)
        self.linear = nn.Linear(widths[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet_small() -> nn.Module:
    """The ``module:factory`` of the tests (``tests.cifar_resnet:resnet_small``), seeded."""
    torch.manual_seed(0)
    return CifarResNet()


@functools.lru_cache(maxsize=1)
def trained_state() -> dict[str, torch.Tensor]:
    """The state dict of :func:`resnet_small` trained on 2 000 ImageNet-normalised CIFAR-10 images."""
    from tests.tiny_models import cifar_subset, fit
    from uap.targets import Normalized

    x, y, _ = cifar_subset()
    net = resnet_small()
    fit(Normalized(net, MEAN, STD), x, y, lr=3e-3, epochs=4, batch_size=64)
    return {k: v.clone() for k, v in net.state_dict().items()}


def trained_weights(folder: Path) -> Path:
    """The trained weights saved plainly (``torch.save(state_dict)``) as ``folder/resnet_small.pth``."""
    path = Path(folder) / "resnet_small.pth"
    torch.save(trained_state(), path)
    return path
