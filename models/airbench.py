"""The airbench network: a small VGG-like CIFAR-10 classifier that trains to ~94 % in 10 epochs.

Keller Jordan, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU" (2024), §3: a frozen 2×2
*patch-whitening* convolution, then three blocks of two 3×3 convolutions (max-pooling after
the first convolution of each block, BatchNorm, GELU), a global max-pool and a linear head
with its logits scaled by 1/9. The choices that make it train fast, each from the paper:

- the first layer is fitted, not learned: its 2·12 filters are the eigenvectors of the 2×2×3
  patch second-moment matrix of the training images, scaled by ``1 / sqrt(λ + ε)``, and their
  negations (so GELU passes both signs); only its bias trains, and only early in the run
  (:meth:`AirbenchNet.fit_whitening`);
- BatchNorm layers have no learned scale (weight fixed at 1; only the bias trains) and a fast
  running-statistics momentum (0.4 in torch's convention, 0.6 in the paper's);
- every convolution starts with a Dirac (identity) filter on its first ``in_channels`` outputs,
  so the fresh network passes its input through.

Images in ``[0, 1]`` are normalised inside (the repo-wide contract). The module returns the
pooled features already multiplied by the head's 1/9 scale (``out_dim = 4 · width``), so
``Linear(out_dim, 10)`` on top is the paper's head; ``width`` is the first block's channel
count (64 in the paper; the other two blocks have ``4 · width``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import CIFAR10_MEAN, CIFAR10_STD, Normalize

__all__ = ["AirbenchNet", "ConvGroup", "airbench_net", "patch_second_moment", "whitening_filters",
           "BATCHNORM_MOMENTUM", "WHITENING_EPS"]

#: torch's BatchNorm momentum (weight of the new batch): the paper's 0.6 is ``1 - 0.4``.
BATCHNORM_MOMENTUM = 0.4
#: ε added to the eigenvalues before the ``1 / sqrt`` of the whitening filters (the paper's 5e-4).
WHITENING_EPS = 5e-4


def _batchnorm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with the scale fixed at 1 (only the bias trains) and a fast running average."""
    bn = nn.BatchNorm2d(channels, momentum=BATCHNORM_MOMENTUM, eps=1e-12)
    bn.weight.requires_grad_(False)
    return bn


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    """3×3 'same' convolution without bias; its first ``min(c_in, c_out)`` filters start as identities."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:min(c_in, c_out)])
    return conv


class ConvGroup(nn.Module):
    """conv → 2×2 max-pool → BN → GELU → conv → BN → GELU (one resolution stage)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1, self.norm1 = _conv(c_in, c_out), _batchnorm(c_out)
        self.conv2, self.norm2 = _conv(c_out, c_out), _batchnorm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


def patch_second_moment(x: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """``E[p pᵀ]`` over every ``patch``×``patch`` patch (stride 1) of the images ``x`` (N×C×H×W):
    a ``(C·patch²)``² matrix, flattened in the order of a conv filter (channel, row, column)."""
    p = F.unfold(x.to(torch.promote_types(x.dtype, torch.float32)), patch)  # N × (C·k·k) × L, conv order
    p = p.transpose(1, 2).reshape(-1, p.shape[1])       # every patch a row
    return p.T @ p / len(p)


def whitening_filters(x: torch.Tensor, patch: int = 2, eps: float = WHITENING_EPS) -> torch.Tensor:
    """Conv filters ``2·C·patch²`` × C × patch × patch that whiten ``x``'s patches: the
    eigenvectors ``v_i`` of :func:`patch_second_moment` scaled by ``1 / sqrt(λ_i + eps)``
    (largest eigenvalue first), followed by their negations, in float32 (float64 for float64 ``x``). The first half maps the patches
    to coordinates with second moment ``diag(λ / (λ + eps))`` ≈ identity."""
    c = x.shape[1]
    eigenvalues, eigenvectors = torch.linalg.eigh(patch_second_moment(x, patch).double())
    order = eigenvalues.argsort(descending=True)
    scaled = eigenvectors[:, order].T / torch.sqrt(eigenvalues[order].clamp(min=0) + eps)[:, None]
    filters = scaled.to(torch.promote_types(x.dtype, torch.float32)).reshape(-1, c, patch, patch)
    return torch.cat([filters, -filters])


class AirbenchNet(nn.Module):
    """Whitening conv → GELU → three :class:`ConvGroup` → global max-pool → × ``scale``.

    Returns N × ``out_dim`` features (``out_dim = widths[-1]``). Call :meth:`fit_whitening`
    with training images before training; until then the first layer is a random convolution.
    """

    def __init__(self, widths: Sequence[int] = (64, 256, 256), patch: int = 2, scale: float = 1 / 9,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD):
        super().__init__()
        if len(widths) != 3 or any(w < 1 for w in widths):
            raise ValueError(f"widths must be three positive channel counts, got {tuple(widths)}")
        self.normalize = Normalize(mean, std)
        self.whiten = nn.Conv2d(3, 2 * 3 * patch * patch, patch, bias=True)
        self.whiten.weight.requires_grad_(False)
        c_in, groups = self.whiten.out_channels, []
        for w in widths:
            groups.append(ConvGroup(c_in, w))
            c_in = w
        self.groups = nn.Sequential(*groups)
        self.scale = scale
        self.out_dim = c_in

    @torch.no_grad()
    def fit_whitening(self, x: torch.Tensor, eps: float = WHITENING_EPS) -> None:
        """Set the whitening filters from images ``x`` in [0, 1] (normalised as in ``forward``)
        and zero its bias."""
        self.whiten.weight.copy_(whitening_filters(self.normalize(x), self.whiten.kernel_size[0], eps))
        self.whiten.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(F.gelu(self.whiten(self.normalize(x))))
        return torch.amax(x, dim=(2, 3)) * self.scale


def airbench_net(width: int = 64, **kwargs) -> AirbenchNet:
    """The paper's network for ``width=64`` (blocks of 64, 256, 256 channels; ~1.97 M parameters)."""
    return AirbenchNet((width, 4 * width, 4 * width), **kwargs)
