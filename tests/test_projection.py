"""project_lp: in the ball, idempotent, and no point of the ball is closer (property tests)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from uap.projection import check_eps, check_norm, lp_norm, project_lp

NORMS = [1.0, 2.0, math.inf]


def _vectors():
    return st.builds(
        lambda seed, d, scale: torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale,
        st.integers(0, 2**31 - 1), st.integers(1, 40), st.floats(0.01, 20.0),
    )


def _random_ball_points(n: int, d: int, eps: float, p: float, g: torch.Generator) -> torch.Tensor:
    """Points of the ℓp ball: random directions rescaled to random radii, plus corners."""
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    z = z / torch.linalg.vector_norm(z, ord=p, dim=1, keepdim=True)
    radii = torch.rand(n, 1, generator=g, dtype=torch.float64) ** (1 / d)
    return z * radii * eps


@settings(max_examples=150, deadline=None)
@given(v=_vectors(), eps=st.floats(0.05, 5.0), p=st.sampled_from(NORMS))
def test_result_in_ball_idempotent_and_closest(v, eps, p):
    w = project_lp(v, eps, p)
    assert lp_norm(w, p).item() <= eps * (1 + 1e-9) + 1e-12
    torch.testing.assert_close(project_lp(w, eps, p), w, rtol=1e-9, atol=1e-12)
    # Optimality: no random point of the ball is closer to v than the projection.
    g = torch.Generator().manual_seed(0)
    others = _random_ball_points(2000, v.numel(), eps, p, g)
    d_best = (v - w).norm()
    assert bool(((others - v).norm(dim=1) >= d_best - 1e-9).all())
    # Local optimality too: small moves of w that stay in the ball never get closer.
    moves = w + 1e-3 * torch.randn(500, v.numel(), generator=g, dtype=torch.float64)
    inside = lp_norm(moves, p, batched=True) <= eps
    assert bool(((moves[inside] - v).norm(dim=1) >= d_best - 1e-12).all())


@pytest.mark.parametrize("p", NORMS)
def test_inside_points_are_unchanged(p):
    v = torch.tensor([0.1, -0.2, 0.05])
    torch.testing.assert_close(project_lp(v, 1.0, p), v, rtol=0, atol=0)


def test_l2_scales_only_when_outside():
    # The original code's first version always rescaled onto the sphere: a small v grew.
    small = torch.tensor([0.3, 0.4])  # ‖·‖₂ = 0.5
    assert torch.equal(project_lp(small, 1.0, 2), small)
    torch.testing.assert_close(project_lp(torch.tensor([3.0, 4.0]), 1.0, 2), torch.tensor([0.6, 0.8]))


def test_l1_matches_closed_forms():
    # Duchi et al.: soft-thresholding by θ with Σ max(|v|−θ, 0) = ε.
    v = torch.tensor([3.0, -1.0, 0.5])
    torch.testing.assert_close(project_lp(v, 1.0, 1), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(project_lp(v, 3.0, 1), torch.tensor([2.5, -0.5, 0.0]))


def test_linf_is_clamp_and_shape_is_kept():
    v = torch.randn(3, 8, 8) * 0.1
    w = project_lp(v, 8 / 255, "inf")
    assert w.shape == v.shape
    torch.testing.assert_close(w, v.clamp(-8 / 255, 8 / 255))


@pytest.mark.parametrize("p", NORMS)
def test_batched_projects_rows_independently(p):
    v = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    rows = torch.stack([project_lp(r, 0.7, p) for r in v])
    torch.testing.assert_close(project_lp(v, 0.7, p, batched=True), rows)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "x"])
def test_bad_eps_is_value_error(bad):
    with pytest.raises(ValueError, match="eps"):
        project_lp(torch.ones(3), bad, 2)
    with pytest.raises(ValueError):
        check_eps(bad)


@pytest.mark.parametrize("bad", [3, 0, "l3", "two", None, True])
def test_unknown_norm_is_value_error(bad):
    with pytest.raises(ValueError, match="norm"):
        project_lp(torch.ones(3), 1.0, bad)


@pytest.mark.parametrize("spelling,p", [("inf", math.inf), ("Linf", math.inf), ("l2", 2.0), (1, 1.0), (2.0, 2.0)])
def test_norm_spellings(spelling, p):
    assert check_norm(spelling) == p
