"""CLIP's contrastive loss against closed forms and explicit loops."""
from __future__ import annotations

import math

import pytest
import torch

from models.clip_loss import clip_loss, info_nce, similarity_logits


def _analytic_grad(n: torch.Tensor, d: torch.Tensor, tau: float) -> torch.Tensor:
    """∂L₁/∂n_i written out term by term (the closed form), with explicit loops."""
    N = len(n)
    out = torch.zeros_like(n)
    for i in range(N):
        ni = n[i]
        nn_ = ni.norm()
        s = [float(ni @ d[j] / (nn_ * d[j].norm())) for j in range(N)]
        e = [math.exp(s[j] / tau) for j in range(N)]
        first = ((ni @ d[i]) * ni - nn_ ** 2 * d[i]) / (N * tau * nn_ ** 3 * d[i].norm())
        second = torch.zeros_like(ni)
        for j in range(N):
            second += e[j] * (nn_ ** 2 * d[j] - (ni @ d[j]) * ni) / (nn_ ** 3 * d[j].norm())
        out[i] = first + second / (N * tau * sum(e))
    return out


@pytest.mark.parametrize("seed,tau", [(0, 0.07), (1, 0.5), (2, 0.01)])
def test_image_to_text_gradient_matches_closed_form(seed, tau):
    g = torch.Generator().manual_seed(seed)
    n = (torch.randn(7, 5, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    d = torch.randn(7, 5, generator=g, dtype=torch.float64) * 0.5
    loss = info_nce(n, d, 1.0 / tau)
    (grad,) = torch.autograd.grad(loss, n)
    expected = _analytic_grad(n.detach(), d, tau)
    assert torch.allclose(grad, expected, atol=1e-5, rtol=0), (grad - expected).abs().max()
    assert grad.abs().max() > 1e-4  # a vanishing gradient would pass trivially


def test_info_nce_matches_explicit_log_softmax():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    scale = 7.0
    total = 0.0
    for i in range(6):
        s = [scale * float(a[i] @ b[j] / (a[i].norm() * b[j].norm())) for j in range(6)]
        total -= s[i] - math.log(sum(math.exp(v) for v in s))
    assert info_nce(a, b, scale).item() == pytest.approx(total / 6, abs=1e-10)


def test_clip_loss_is_the_mean_of_both_directions():
    g = torch.Generator().manual_seed(4)
    img, txt = torch.randn(9, 8, generator=g, dtype=torch.float64), torch.randn(9, 8, generator=g, dtype=torch.float64)
    expected = 0.5 * (info_nce(img, txt, 20.0) + info_nce(txt, img, 20.0))
    assert clip_loss(img, txt, 20.0).item() == pytest.approx(expected.item(), abs=1e-12)
    # asymmetric inputs: the two directions really differ, so the mean is a real check
    assert info_nce(img, txt, 20.0).item() != pytest.approx(info_nce(txt, img, 20.0).item(), abs=1e-6)


def test_loss_is_scale_invariant_in_embeddings_and_minimal_for_matched_pairs():
    g = torch.Generator().manual_seed(5)
    img = torch.randn(5, 6, generator=g, dtype=torch.float64)
    assert clip_loss(img, img * 3.0, 100.0).item() < 1e-3  # perfectly aligned pairs: loss ≈ 0
    assert clip_loss(img * 10, img, 100.0).item() == pytest.approx(clip_loss(img, img, 100.0).item(), abs=1e-12)
    logits = similarity_logits(img, img, 1.0)
    assert torch.allclose(torch.diagonal(logits), torch.ones(5, dtype=torch.float64))


def test_mismatched_batches_raise():
    with pytest.raises(ValueError, match="pairs"):
        clip_loss(torch.randn(4, 3), torch.randn(5, 3), 1.0)
    with pytest.raises(ValueError, match="same D"):
        similarity_logits(torch.randn(4, 3), torch.randn(4, 2), 1.0)
