"""Message-passing layers on batched node features (B×N×D), dense or k-nearest-neighbour graphs.

A graph layer updates every node from its own features and an aggregate of its neighbours'.
Two aggregations, each with one set of weights shared by every node and every neighbour:

- :class:`SumGraphConv` — ``H' = σ(A H W_nbr + H W_self + b)``: the sum of the neighbours'
  features through one shared neighbour weight (Kipf & Welling, ICLR 2017, without their
  degree normalisation; Morris et al., AAAI 2019, "GraphConv").
- :class:`MaxRelativeGraphConv` — the max-relative graph convolution of Vision GNN (Han et
  al., NeurIPS 2022, "Vision GNN: An Image is Worth Graph of Nodes", §3.2, after Li et al.,
  ICCV 2019, "DeepGCNs"): ``h'_i = σ([h_i, max_{j∈N(i)} (h_j − h_i)] W + b)``, the max taken
  per channel.

Each takes its graph in one of two forms:

- ``adj``: a dense adjacency, N×N (one graph for the whole batch) or B×N×N (one per
  sample); ``A[i, j] ≠ 0`` means j is a neighbour of i (the sum weighs j by ``A[i, j]``).
- ``neighbours``: a B×N×k index tensor, node i's k neighbours, e.g. from :func:`knn_graph`.

:class:`DynamicGraphConv` wraps either layer with the "dynamic graph" of DGCNN (Wang et al.,
TOG 2019) and ViG: each forward recomputes every node's k nearest neighbours in feature
space, batched (``torch.cdist`` + ``topk`` + a gather), no loop over nodes.

Why weights are shared: relabel the nodes by a permutation P. The relabelled graph is
``PAPᵀ`` with features ``PH``; ``(PAPᵀ)(PH) = P(AH)`` because ``PᵀP = I``, and a node-wise
linear map commutes with P, so ``f(PAPᵀ, PH) = P f(A, H)``: the layer is permutation
*equivariant*. The max over a neighbour set does not depend on the order it is listed in,
and the k nearest neighbours of a node are the same nodes whatever their labels (ties
aside), so the max-relative and the k-NN forms are equivariant for the same reason.
Pooling over nodes (:func:`global_mean_pool`, :func:`global_max_pool`) is then permutation
*invariant*: a graph-level output does not depend on how the nodes were numbered. A layer
that gave each neighbour *position* its own weight would lose this — relabelling moves a
node to another weight — which ``tests/test_graph_layers.py`` shows with a counterexample.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "knn_graph", "adjacency_from_neighbours", "gather_neighbours", "sum_aggregate", "max_relative",
    "SumGraphConv", "MaxRelativeGraphConv", "DynamicGraphConv", "global_mean_pool", "global_max_pool",
]

Activation = Callable[[torch.Tensor], torch.Tensor]


def _check_features(h: torch.Tensor) -> None:
    if h.dim() != 3:
        raise ValueError(f"node features must be B×N×D, got shape {tuple(h.shape)}")


def _check_graph(h: torch.Tensor, adj: torch.Tensor | None, neighbours: torch.Tensor | None) -> None:
    _check_features(h)
    if (adj is None) == (neighbours is None):
        raise ValueError("pass the graph as exactly one of adj (dense adjacency) or neighbours (B×N×k indices)")
    b, n = h.shape[:2]
    if adj is not None and not (adj.shape in ((n, n), (b, n, n))):
        raise ValueError(f"adj must be N×N or B×N×N for {b}×{n} nodes, got shape {tuple(adj.shape)}")
    if neighbours is not None and (neighbours.dim() != 3 or neighbours.shape[:2] != (b, n)):
        raise ValueError(f"neighbours must be B×N×k indices for {b}×{n} nodes, got shape {tuple(neighbours.shape)}")


def knn_graph(h: torch.Tensor, k: int, normalize: bool = True) -> torch.Tensor:
    """The k nearest neighbours of every node in feature space: B×N×k indices into the node axis.

    ``h`` is B×N×D; distances are Euclidean, between L2-normalised features when
    ``normalize`` (as ViG does, so the graph follows the features' directions, not their
    scale). A node is its own nearest neighbour (distance 0) and is included, as in ViG.
    The indices carry no gradient: the graph is a discrete choice made from the features."""
    _check_features(h)
    n = h.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for {n} nodes, got {k}")
    with torch.no_grad():
        z = F.normalize(h.float(), dim=-1) if normalize else h.float()
        return torch.cdist(z, z).topk(k, dim=-1, largest=False).indices


def adjacency_from_neighbours(neighbours: torch.Tensor, n: int) -> torch.Tensor:
    """The dense B×N×N 0/1 adjacency of a B×N×k neighbour index (``A[b, i, j] = 1`` iff j is
    among i's neighbours): the same graph in the form the ``adj`` argument takes."""
    adj = torch.zeros(*neighbours.shape[:2], n, device=neighbours.device)
    return adj.scatter_(-1, neighbours, 1.0)


def gather_neighbours(h: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """Node features of each node's neighbours: ``out[b, i, m] = h[b, neighbours[b, i, m]]``,
    B×N×k×D, one ``index_select`` over the flattened B·N nodes (its backward, an index add,
    is about twice as fast on the CPU as advanced indexing's)."""
    b, n, d = h.shape
    offsets = torch.arange(b, device=h.device).view(-1, 1, 1) * n
    rows = (neighbours + offsets).reshape(-1)
    return h.reshape(b * n, d).index_select(0, rows).view(*neighbours.shape, d)


def sum_aggregate(h: torch.Tensor, adj: torch.Tensor | None = None,
                  neighbours: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_j A[i, j] h_j`` per node (B×N×D): ``A H`` for a dense graph, the sum over the k
    gathered neighbours for an index graph (the same thing for a 0/1 adjacency)."""
    _check_graph(h, adj, neighbours)
    if adj is not None:
        return torch.matmul(adj.to(h.dtype), h)
    return gather_neighbours(h, neighbours).sum(dim=2)


def max_relative(h: torch.Tensor, adj: torch.Tensor | None = None,
                 neighbours: torch.Tensor | None = None) -> torch.Tensor:
    """``max_{j∈N(i)} (h_j − h_i)`` per node and channel (B×N×D), ViG's max-relative aggregate.

    Computed as ``(max_j h_j) − h_i``, the same per channel since ``h_i`` does not depend on
    j. In the dense form j ranges over ``A[i, j] ≠ 0`` (a B×N×N×D masked max, so meant for
    small graphs); a node without neighbours gets 0. The index form gathers B×N×k×D."""
    _check_graph(h, adj, neighbours)
    if neighbours is not None:
        return gather_neighbours(h, neighbours).max(dim=2).values - h  # max: its backward is a scatter
    mask = (adj != 0).expand(h.shape[0], -1, -1).unsqueeze(-1)             # B×N(i)×N(j)×1
    candidates = torch.where(mask, h.unsqueeze(1), float("-inf"))           # B×N×N×D: h_j where j ∈ N(i)
    nearest = candidates.amax(dim=2) - h
    return torch.where(mask.any(dim=2), nearest, torch.zeros_like(nearest))


class SumGraphConv(nn.Module):
    """``H' = σ(A H W_nbr + H W_self + b)``: one neighbour weight shared by every node and
    neighbour, one self weight; permutation equivariant (module docstring).

    ``activation`` defaults to ReLU; pass ``nn.Identity()`` for a linear layer.
    ``forward(h, adj)`` or ``forward(h, neighbours=idx)`` with ``h`` B×N×``dim_in``."""

    def __init__(self, dim_in: int, dim_out: int, activation: Activation | None = None):
        super().__init__()
        self.neighbour = nn.Linear(dim_in, dim_out, bias=False)
        self.self_loop = nn.Linear(dim_in, dim_out)
        self.activation = activation if activation is not None else nn.ReLU()

    def forward(self, h: torch.Tensor, adj: torch.Tensor | None = None, *,
                neighbours: torch.Tensor | None = None) -> torch.Tensor:
        return self.activation(self.neighbour(sum_aggregate(h, adj, neighbours)) + self.self_loop(h))


class MaxRelativeGraphConv(nn.Module):
    """ViG's max-relative graph convolution: ``h'_i = σ([h_i, max_{j∈N(i)} (h_j − h_i)] W + b)``,
    one linear map of the node and its aggregate, shared by every node; permutation equivariant.

    ``activation`` defaults to the identity (ViG follows it with a norm and GELU, which
    :class:`models.vig.Grapher` adds). ``forward(h, adj)`` or ``forward(h, neighbours=idx)``."""

    def __init__(self, dim_in: int, dim_out: int, activation: Activation | None = None):
        super().__init__()
        self.linear = nn.Linear(2 * dim_in, dim_out)
        self.activation = activation if activation is not None else nn.Identity()

    def forward(self, h: torch.Tensor, adj: torch.Tensor | None = None, *,
                neighbours: torch.Tensor | None = None) -> torch.Tensor:
        return self.activation(self.linear(torch.cat([h, max_relative(h, adj, neighbours)], dim=-1)))


class DynamicGraphConv(nn.Module):
    """A graph layer on the k-nearest-neighbour graph of its own input, rebuilt every forward
    (DGCNN's and ViG's dynamic graph): ``forward(h) = conv(h, neighbours=knn_graph(h, k))``.

    ``conv`` is a :class:`SumGraphConv` or :class:`MaxRelativeGraphConv` (anything taking
    ``neighbours=``); ``normalize`` is :func:`knn_graph`'s."""

    def __init__(self, conv: nn.Module, k: int, normalize: bool = True):
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be a positive neighbour count, got {k}")
        self.conv, self.k, self.normalize = conv, k, normalize

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv(h, neighbours=knn_graph(h, self.k, self.normalize))


def global_mean_pool(h: torch.Tensor) -> torch.Tensor:
    """The mean over nodes, B×N×D → B×D: invariant to the order of the nodes."""
    _check_features(h)
    return h.mean(dim=1)


def global_max_pool(h: torch.Tensor) -> torch.Tensor:
    """The per-channel max over nodes, B×N×D → B×D: invariant to the order of the nodes."""
    _check_features(h)
    return h.amax(dim=1)
