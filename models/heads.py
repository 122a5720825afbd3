"""Heads that sit on top of a backbone during self-supervised training (discarded afterwards).

- :class:`ProjectionHead` — the MLP ``g(·)`` of SimCLR §2.1 / MoCo v2 (Linear–BN–ReLU–Linear);
  the loss is computed on its output, the representation is taken before it.
- :class:`BYOLPredictionHead` — BYOL's predictor ``q_θ`` (§3.1), only on the online branch;
  the asymmetry it creates is what prevents collapse without negatives.
- :class:`DINOHead` — DINO §3.1 / App. C: 3-layer MLP (GELU) → L2-normalised bottleneck →
  weight-normalised linear layer onto ``K`` prototypes (its norm ``g`` fixed to 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["ProjectionHead", "SimCLRProjectionHead", "BYOLProjectionHead", "BYOLPredictionHead", "DINOHead"]


class ProjectionHead(nn.Module):
    """MLP ``in → hidden → … → out`` with BatchNorm + ReLU between layers (none after the last
    unless ``last_bn``)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, last_bn: bool = False):
        super().__init__()
        if layers < 1:
            raise ValueError(f"a head needs at least one layer, got {layers}")
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
        blocks: list[nn.Module] = []
        for i in range(layers):
            last = i == layers - 1
            blocks.append(nn.Linear(dims[i], dims[i + 1], bias=last and not last_bn))
            if not last:
                blocks += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
            elif last_bn:
                blocks.append(nn.BatchNorm1d(dims[i + 1], affine=False))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SimCLRProjectionHead(ProjectionHead):
    """SimCLR's ``g``: 2 layers, hidden = input width, 128-d output (SimCLR App. B.4)."""

    def __init__(self, in_dim: int, hidden_dim: int | None = None, out_dim: int = 128):
        super().__init__(in_dim, hidden_dim or in_dim, out_dim, layers=2)


class BYOLProjectionHead(ProjectionHead):
    """BYOL's projector: Linear(in, hidden)–BN–ReLU–Linear(hidden, out) (paper: 4096 → 256)."""

    def __init__(self, in_dim: int, hidden_dim: int = 1024, out_dim: int = 128):
        super().__init__(in_dim, hidden_dim, out_dim, layers=2)


class BYOLPredictionHead(ProjectionHead):
    """BYOL's predictor: same shape as the projector, applied to its output."""

    def __init__(self, in_dim: int = 128, hidden_dim: int = 1024, out_dim: int = 128):
        super().__init__(in_dim, hidden_dim, out_dim, layers=2)


class DINOHead(nn.Module):
    """MLP → L2-normalised bottleneck → weight-normalised prototypes (no bias, ``g = 1``)."""

    def __init__(self, in_dim: int, out_dim: int = 1024, hidden_dim: int = 512, bottleneck_dim: int = 128,
                 layers: int = 3):
        super().__init__()
        if layers < 2:
            raise ValueError("the DINO head needs at least 2 MLP layers")
        dims = [in_dim] + [hidden_dim] * (layers - 1)
        blocks: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            blocks += [nn.Linear(a, b), nn.GELU()]
        blocks.append(nn.Linear(dims[-1], bottleneck_dim))
        self.mlp = nn.Sequential(*blocks)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(False)  # DINO's norm_last_layer=True: prototypes stay unit-norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))
