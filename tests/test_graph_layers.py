"""Graph layers (models.graph): the permutation properties their design claims, as tests.

Relabelling the nodes of a graph by a permutation P maps (A, H) to (PAPᵀ, PH). A layer with
weights shared over nodes and neighbours must answer with P f(A, H) (equivariance), a pooled
readout with the same vector (invariance); a layer that weighs each neighbour by its node
index must not, and the check below finds the counterexample.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from models.graph import (DynamicGraphConv, MaxRelativeGraphConv, SumGraphConv, adjacency_from_neighbours,
                          global_max_pool, global_mean_pool, knn_graph, max_relative, sum_aggregate)

B, N, D = 3, 12, 5


def _graph(seed: int, batched: bool = True, weighted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Random features (continuous: no ties) and a random directed graph, ~30 % of the edges."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, N, D, generator=g)
    shape = (B, N, N) if batched else (N, N)
    adj = (torch.rand(shape, generator=g) < 0.3).float()
    if weighted:
        adj = adj * torch.rand(shape, generator=g)
    return h, adj


def _permute(h: torch.Tensor, adj: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(PH, PAPᵀ): node i of the relabelled graph is node perm[i] of the original."""
    return h[:, perm], adj[..., perm, :][..., perm]


def _equivariant(f, h: torch.Tensor, adj: torch.Tensor | None, perm: torch.Tensor) -> bool:
    """Whether ``f(PAPᵀ, PH) == P f(A, H)`` to float tolerance (``adj=None``: ``f(PH) == P f(H)``)."""
    if adj is None:
        return torch.allclose(f(h[:, perm]), f(h)[:, perm], atol=1e-5, rtol=1e-5)
    ph, padj = _permute(h, adj, perm)
    return torch.allclose(f(ph, padj), f(h, adj)[:, perm], atol=1e-5, rtol=1e-5)


class PositionalSumConv(nn.Module):
    """The counterexample: ``h'_i = Σ_j A[i, j] h_j W_j + h_i W_self``, a separate weight ``W_j``
    for each neighbour *position* j (the node's index in a fixed ordering), as a dense layer
    over flattened neighbourhoods would have. Relabelling moves node j to another weight."""

    def __init__(self, n: int, dim_in: int, dim_out: int):
        super().__init__()
        self.per_slot = nn.Parameter(torch.randn(n, dim_in, dim_out) / dim_in ** 0.5)
        self.self_loop = nn.Linear(dim_in, dim_out)

    def forward(self, h: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.einsum("...ij,bjd,jde->bie", adj, h, self.per_slot) + self.self_loop(h))


LAYERS = {"sum": lambda: SumGraphConv(D, 7), "max_relative": lambda: MaxRelativeGraphConv(D, 7, activation=torch.tanh)}


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("batched", [True, False])
def test_shared_weight_layers_are_permutation_equivariant(name, batched):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    for seed in range(5):
        h, adj = _graph(seed, batched, weighted=name == "sum")
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(100 + seed))
        assert _equivariant(layer, h, adj, perm), f"{name}, seed {seed}"


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_knn_layers_are_permutation_equivariant(name):
    """The graph is rebuilt from the features inside the layer: permuting the nodes permutes
    each node's neighbour set by the same relabelling, so the output is permuted too."""
    torch.manual_seed(0)
    layer = DynamicGraphConv(LAYERS[name](), k=4)
    for seed in range(5):
        h, _ = _graph(seed)
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(100 + seed))
        assert _equivariant(layer, h, None, perm), f"{name}, seed {seed}"
    assert not torch.allclose(layer(h), LAYERS[name]().to(h)(h, neighbours=knn_graph(h, 4)))  # the weights matter


def test_pooling_is_permutation_invariant():
    h, _ = _graph(0)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    for pool in (global_mean_pool, global_max_pool):
        torch.testing.assert_close(pool(h[:, perm]), pool(h))
    torch.testing.assert_close(global_mean_pool(h), h.sum(1) / N)
    # A readout that reads nodes by position (the first node's features) is not invariant.
    assert not torch.allclose(h[:, perm][:, 0], h[:, 0])


def test_a_layer_with_a_weight_per_neighbour_position_is_not_equivariant():
    """The same check that passes for the shared-weight layers finds a counterexample here."""
    torch.manual_seed(0)
    positional, shared = PositionalSumConv(N, D, 7), SumGraphConv(D, 7)
    h, adj = _graph(0)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    assert _equivariant(shared, h, adj, perm)
    assert not _equivariant(positional, h, adj, perm)
    # With every per-slot weight equal it is the shared layer again, and equivariant.
    with torch.no_grad():
        positional.per_slot.copy_(positional.per_slot[:1].expand(N, -1, -1))
    assert _equivariant(positional, h, adj, perm)


def test_max_relative_matches_its_definition_and_the_dense_and_index_forms_agree():
    h, adj = _graph(3)
    adj[0, 2] = 0  # node 2 of the first graph has no neighbours: its aggregate is 0
    expected = torch.zeros_like(h)
    for b in range(B):
        for i in range(N):
            nbrs = adj[b, i].nonzero().squeeze(1)
            if len(nbrs):
                expected[b, i] = (h[b, nbrs] - h[b, i]).amax(0)
    torch.testing.assert_close(max_relative(h, adj), expected)
    torch.testing.assert_close(sum_aggregate(h, adj), torch.einsum("bij,bjd->bid", adj, h))

    idx = knn_graph(h, 4)
    dense = adjacency_from_neighbours(idx, N)
    assert dense.sum(-1).eq(4).all()
    torch.testing.assert_close(max_relative(h, neighbours=idx), max_relative(h, dense))
    torch.testing.assert_close(sum_aggregate(h, neighbours=idx), sum_aggregate(h, dense))
    layer = MaxRelativeGraphConv(D, 6)
    torch.testing.assert_close(layer(h, neighbours=idx), layer(h, dense))


def test_max_relative_gradient_is_finite_for_isolated_nodes():
    h, adj = _graph(4)
    adj[:, 0] = 0
    h.requires_grad_(True)
    MaxRelativeGraphConv(D, 6)(h, adj).sum().backward()
    assert torch.isfinite(h.grad).all()


def test_knn_graph_is_the_k_nearest_in_normalised_feature_space():
    h, _ = _graph(5)
    idx = knn_graph(h, 5)
    z = torch.nn.functional.normalize(h, dim=-1)
    brute = ((z[:, :, None] - z[:, None]) ** 2).sum(-1).argsort(-1)[..., :5]
    assert torch.equal(idx.sort(-1).values, brute.sort(-1).values)
    assert (idx == torch.arange(N).view(1, N, 1)).any(-1).all()  # each node is its own nearest
    raw = knn_graph(h, 5, normalize=False)
    assert torch.equal(raw.sort(-1).values, torch.cdist(h, h).argsort(-1)[..., :5].sort(-1).values)


def test_bad_graphs_are_clear_errors():
    h, adj = _graph(0)
    layer = SumGraphConv(D, 4)
    with pytest.raises(ValueError, match="exactly one of adj"):
        layer(h)
    with pytest.raises(ValueError, match="exactly one of adj"):
        layer(h, adj, neighbours=knn_graph(h, 2))
    with pytest.raises(ValueError, match="adj must be N×N or B×N×N"):
        layer(h, adj[:, :4])
    with pytest.raises(ValueError, match="node features must be B×N×D"):
        layer(h[0], adj[0])
    with pytest.raises(ValueError, match=r"k must be in \[1, 12\]"):
        knn_graph(h, 13)
