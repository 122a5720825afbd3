"""The ``vig`` backbone: an isotropic Vision GNN at CIFAR size (Han et al., NeurIPS 2022).

A convolutional stem turns each 4×4 patch into a node (64 nodes, learned position embedding),
then blocks of a :class:`Grapher` (the k-nearest-neighbour graph of the current node features,
rebuilt every block, and a max-relative graph convolution, :mod:`models.graph`) and a
:class:`NodeFFN`, each a residual branch; features are the mean over nodes. Only the position
embedding tells the blocks where a patch was: the graph layers are permutation equivariant.
Built by :func:`models.backbones.build_backbone` as ``"vig"``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import CIFAR10_MEAN, CIFAR10_STD, Normalize
from models.graph import DynamicGraphConv, MaxRelativeGraphConv, global_mean_pool

__all__ = ["node_batch_norm", "NodeLinear", "Grapher", "NodeFFN", "VisionGNN", "vig_cifar"]



def node_batch_norm(norm: nn.BatchNorm1d, h: torch.Tensor) -> torch.Tensor:
    """BatchNorm over the channels of B×N×D node features, every node of every image one
    sample: applied to the contiguous (B·N)×D view, several times faster on the CPU (forward
    and backward) than to the strided B×D×N transpose."""
    return norm(h.reshape(-1, h.shape[-1])).view_as(h)


class NodeLinear(nn.Module):
    """A linear map of every node followed by BatchNorm over the channels (ViG's 1×1
    convolution + BN, on B×N×D node features)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.norm = nn.BatchNorm1d(dim_out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return node_batch_norm(self.norm, self.linear(h))


class Grapher(nn.Module):
    """ViG's Grapher block: ``h + FC_out(GELU(BN(GraphConv(FC_in(h)))))`` (Han et al. 2022, §3.2).

    The graph is each node's ``k`` nearest neighbours among the FC_in features, rebuilt every
    forward; the graph convolution is max-relative (:class:`models.graph.MaxRelativeGraphConv`)
    and widens to ``2·dim`` as in the paper; the FCs project the nodes into and out of the
    graph convolution's space, which with the FFN after the block keeps the node features
    diverse (the paper's remedy for the over-smoothing of deep GCNs)."""

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.fc_in = NodeLinear(dim, dim)
        self.graph_conv = DynamicGraphConv(MaxRelativeGraphConv(dim, 2 * dim), k)
        self.norm = nn.BatchNorm1d(2 * dim)
        self.fc_out = NodeLinear(2 * dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        g = node_batch_norm(self.norm, self.graph_conv(self.fc_in(h)))
        return h + self.fc_out(F.gelu(g))


class NodeFFN(nn.Module):
    """ViG's FFN block: ``h + FC₂(GELU(FC₁(h)))``, each FC with BatchNorm, hidden width ``hidden``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = NodeLinear(dim, hidden)
        self.fc2 = NodeLinear(hidden, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(F.gelu(self.fc1(h)))


class VisionGNN(nn.Module):
    """Isotropic Vision GNN (ViG) on ``patch``×``patch`` patches; returns the mean of the final
    node features (``out_dim = dim``).

    The stem is ViG's: stride-2 3×3 convolutions (BN + GELU) down to one node per patch, then a
    stride-1 3×3 convolution with BN; ``patch`` must be a power of two and the image a
    ``image_size``×``image_size`` one (the position embedding has one entry per node). Each of
    the ``depth`` blocks is a :class:`Grapher` with ``k`` neighbours and a :class:`NodeFFN` of
    width ``mlp_ratio · dim``. No stochastic depth (the paper's ViG-Ti uses 0.1 over 300
    ImageNet epochs): a model this small on a short CIFAR schedule is limited by fitting, not
    by overfitting (the zoo's ViT of this width still lowered its training loss at its last epoch)."""

    def __init__(self, image_size: int = 32, patch: int = 4, dim: int = 96, depth: int = 6, k: int = 8,
                 mlp_ratio: float = 4.0, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD):
        super().__init__()
        if patch < 1 or patch & (patch - 1):
            raise ValueError(f"patch must be a power of two, got {patch}")
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
        nodes = (image_size // patch) ** 2
        if not 1 <= k <= nodes:
            raise ValueError(f"k must be in [1, {nodes}] for {nodes} nodes, got {k}")
        self.normalize = Normalize(mean, std)
        self.image_size = image_size
        downsamples = patch.bit_length() - 1
        layers: list[nn.Module] = []
        c_in = 3
        for i in range(downsamples):  # channels double up to dim: dim/2^(s-1), …, dim/2, dim
            c_out = max(dim >> (downsamples - 1 - i), 8)
            layers += [nn.Conv2d(c_in, c_out, 3, 2, 1), nn.BatchNorm2d(c_out), nn.GELU()]
            c_in = c_out
        layers += [nn.Conv2d(c_in, dim, 3, 1, 1), nn.BatchNorm2d(dim)]
        self.stem = nn.Sequential(*layers)
        self.pos_embed = nn.Parameter(torch.zeros(1, nodes, dim))
        hidden = int(dim * mlp_ratio)
        self.blocks = nn.Sequential(*[m for _ in range(depth) for m in (Grapher(dim, k), NodeFFN(dim, hidden))])
        self.out_dim = dim

    def nodes(self, x: torch.Tensor) -> torch.Tensor:
        """The input nodes of images ``x`` (B×3×H×W in [0, 1]): normalised, stemmed, one node per
        patch in row-major order, position embedding added; B×N×dim."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"this ViG takes {self.image_size}×{self.image_size} images, got "
                             f"{x.shape[-2]}×{x.shape[-1]}")
        return self.stem(self.normalize(x)).flatten(2).transpose(1, 2) + self.pos_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return global_mean_pool(self.blocks(self.nodes(x)))


def vig_cifar(dim: int = 96, depth: int = 6, k: int = 8, patch: int = 4, **kwargs) -> VisionGNN:
    """A small ViG for 32×32 images (4×4 patches → 64 nodes, 8 neighbours, dim 96, 6 Grapher +
    FFN pairs); 977 568 parameters by default (``vit_tiny``: 682 272; the
    convolutional stem holds 126 432 of them)."""
    return VisionGNN(patch=patch, dim=dim, depth=depth, k=k, **kwargs)


