"""Metrics: fooling rate vs clean predictions (not labels), the clean-prediction cache."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.tiny_models import tiny_mlp
from uap.forward import eval_mode
from uap.metrics import CleanPredictions, accuracy, clean_predictions, dominant_label, fooling_rate, predict


def _images(n=50, seed=0):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


class _Counting(nn.Module):
    """Wraps a model and counts the images it sees."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, 0

    def forward(self, x):
        self.seen += x.shape[0]
        return self.model(x)


def test_fooling_rate_matches_explicit_loop():
    model, x = tiny_mlp(), _images()
    v = 0.2 * torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = sum(int(model(x[i:i + 1]).argmax()) != int(model((x[i:i + 1] + v).clamp(0, 1)).argmax())
                       for i in range(len(x))) / len(x)
    assert expected > 0  # the check can fail
    assert fooling_rate(model, x, v, batch_size=7) == pytest.approx(expected)
    assert fooling_rate(model, x, torch.zeros(3, 8, 8)) == 0.0


def test_fooling_rate_is_not_error_rate():
    # All labels wrong but a zero perturbation changes nothing: error rate 1, fooling rate 0.
    model, x = tiny_mlp(), _images()
    wrong = (predict(model, x) + 1) % 5
    assert accuracy(model, x, wrong) == 0.0
    assert fooling_rate(model, x, torch.zeros(3, 8, 8)) == 0.0


def test_accuracy_under_v_matches_loop():
    model, x = tiny_mlp(), _images()
    y = torch.randint(0, 5, (len(x),), generator=torch.Generator().manual_seed(2))
    v = torch.full((3, 8, 8), 0.3)
    with torch.no_grad():
        expected = sum(int(model((x[i:i + 1] + v).clamp(0, 1)).argmax()) == int(y[i]) for i in range(len(x))) / len(x)
    assert accuracy(model, x, y, v) == pytest.approx(expected)


def test_clean_predictions_are_cached_and_invalidated():
    model, x = _Counting(tiny_mlp()), _images(20)
    cache = CleanPredictions()
    first = cache.get(model, x)
    assert model.seen == 20
    assert torch.equal(cache.get(model, x), first) and model.seen == 20 and cache.hits == 1
    # One evaluation of a perturbation costs one forward pass per image (shared cache).
    model.seen = 0
    clean_predictions(model, x)
    fooling_rate(model, x, torch.zeros(3, 8, 8))
    assert model.seen == 40  # 20 clean (first time in the shared cache) + 20 perturbed
    model.seen = 0
    fooling_rate(model, x, torch.zeros(3, 8, 8))
    assert model.seen == 20
    # Changing the weights in place, or the data, invalidates the entry.
    with torch.no_grad():
        model.model.net[1].weight.mul_(-1)
    cache.get(model, x)
    assert cache.misses == 2
    x.add_(0.0)  # an in-place operation that changes no value: the same images
    cache.get(model, x)
    assert cache.misses == 2
    x[0, 0, 0, 0] = 1.0 - x[0, 0, 0, 0]  # one value changed in place: other images
    cache.get(model, x)
    assert cache.misses == 3
    cache.get(model, x.clone())  # another tensor with equal values: the same key
    assert cache.misses == 3


def test_dominant_label():
    model, x = tiny_mlp(), _images()
    label, share = dominant_label(model, x, torch.zeros(3, 8, 8))
    pred = predict(model, x)
    assert label == int(torch.bincount(pred).argmax()) and share == pytest.approx((pred == label).float().mean().item())


class _Vector(nn.Module):
    def forward(self, x):
        return x.mean(dim=(1, 2, 3))


def test_bad_input():
    model, x = tiny_mlp(), _images(4)
    with pytest.raises(ValueError, match="does not match"):
        fooling_rate(model, x, torch.zeros(3, 9, 9))
    with pytest.raises(ValueError, match="N×C"):
        fooling_rate(_Vector(), x, torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="empty"):
        fooling_rate(model, x[:0], torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="labels"):
        accuracy(model, x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size"):
        predict(model, x, batch_size=0)


def test_model_mode_is_restored():
    model, x = tiny_mlp(), _images(4)
    model.train()
    predict(model, x)
    assert model.training


def test_eval_mode_gives_every_submodule_back_its_own_mode():
    """A training model around a frozen (eval-mode) part gets exactly that back, and a
    dropout model is deterministic inside the block."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Sequential(nn.Linear(4, 2), nn.Dropout(0.5)))
    model.train()
    model[2].eval()  # e.g. a frozen encoder inside a model being fine-tuned
    before = [m.training for m in model.modules()]
    x = torch.rand(8, 4)
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
        assert torch.equal(model(x), model(x))
    assert [m.training for m in model.modules()] == before == [True, True, True, False, False, False]


def test_eval_mode_leaves_a_model_in_eval_mode_alone():
    """Attacks enter the block once per DeepFool call: an eval-mode model is not walked again."""
    calls = []

    class Recording(nn.Linear):
        def train(self, mode=True):
            calls.append(mode)
            return super().train(mode)

    model = nn.Sequential(Recording(4, 2)).eval()
    calls.clear()
    with eval_mode(model):
        pass
    assert calls == []
    model.train()
    calls.clear()
    with eval_mode(model):
        assert calls == [False]
    assert calls == [False, True] and model.training and model[0].training
