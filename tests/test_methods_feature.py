"""Label-free feature UAPs (``method="feature"``) on a tiny encoder."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import uap
import uap.methods  # noqa: F401  (registers the methods)
from uap.methods.feature import embedding_distance
from tests.method_models import TinyEncoderModel, blobs


def _mean_cosine_distance(encoder, x, v):
    with torch.no_grad():
        a, b = encoder(x), encoder((x + v).clamp(0, 1))
    return (1 - nn.functional.cosine_similarity(a, b, dim=1)).mean().item()


@pytest.mark.parametrize("norm, eps", [(math.inf, 8 / 255), (2, 0.5)])
def test_feature_uap_moves_embeddings_more_than_random_noise_of_the_same_norm(norm, eps):
    model = TinyEncoderModel()
    x, _ = blobs(128, seed=3)
    xh, _ = blobs(128, seed=4)
    p = uap.craft(model, x, eps=eps, norm=norm, method="feature", max_passes=3)
    assert uap.lp_norm(p.v, norm).item() <= eps * (1 + 1e-5)
    # random noise at the full budget (for ℓ∞: every pixel ±ε, the strongest random draw)
    noise = uap.random_perturbation(p.v.shape, eps, norm, seed=1)
    crafted = _mean_cosine_distance(model.encoder, xh, p.v)
    random = _mean_cosine_distance(model.encoder, xh, noise)
    assert crafted > 3 * random, (crafted, random)
    assert len(p.history) == 3 and p.history[-1]["updates"] == 4  # 128 images / batch 32


def test_embedding_distance_matches_closed_forms():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[0.0, 3.0], [0.0, -1.0]])
    # cos = 0 and −1 → distances 1 and 2
    assert embedding_distance(a, b).item() == pytest.approx(1.5)
    # ‖a−b‖² = 10 and 9, ‖a‖² = 1 and 4 → (19/2) / (5/2)
    assert embedding_distance(a, b, "l2").item() == pytest.approx(19 / 5)
    with pytest.raises(ValueError, match="unknown distance"):
        embedding_distance(a, b, "kl")


def test_feature_method_needs_an_encoder_and_valid_options():
    x, _ = blobs(8, seed=0)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    with pytest.raises(ValueError, match="encoder"):
        uap.craft(plain, x, eps=0.1, method="feature")
    model = TinyEncoderModel()
    with pytest.raises(ValueError, match="unknown distance"):
        uap.craft(model, x, eps=0.1, method="feature", method_options={"distance": "kl"})
    with pytest.raises(ValueError, match="init"):
        uap.craft(model, x, eps=0.1, method="feature", method_options={"init": 0})


def test_feature_uap_with_l2_distance_runs_and_is_seeded():
    model = TinyEncoderModel()
    x, _ = blobs(64, seed=3)
    a = uap.craft(model, x, eps=0.5, norm=2, method="feature", max_passes=2, seed=1,
                  method_options={"distance": "l2"})
    b = uap.craft(model, x, eps=0.5, norm=2, method="feature", max_passes=2, seed=1,
                  method_options={"distance": "l2"})
    assert torch.equal(a.v, b.v) and bool(a.v.any())
