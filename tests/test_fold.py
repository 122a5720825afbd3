"""Batch-norm folding (uap.fold): the folded copy is the same function, the model is untouched,
and whatever cannot be folded safely is left as it is."""
from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

import uap.fold
from tests.tiny_models import BNNet, randomise_batchnorm
from uap import craft
from uap.fold import count_batchnorm, fold_batchnorm



def _images(n=16, seed=0):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_folded_copy_is_the_same_function_with_no_batchnorm_left():
    model, x = BNNet().eval(), _images()
    folded = fold_batchnorm(model, x[:4])
    assert folded is not model
    assert count_batchnorm(model) == 5 and count_batchnorm(folded) == 0
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    # … and so are the input gradients that DeepFool uses
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(model(xa)[:, 3].sum(), xa)
    (gb,) = torch.autograd.grad(folded(xb)[:, 3].sum(), xb)
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)
    assert not any(p.requires_grad for p in folded.parameters())  # attacks need input gradients only


def test_the_model_itself_is_untouched():
    model, x = BNNet(), _images()
    model.train()
    model.block.eval()  # a frozen part: its mode must survive too
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fold_batchnorm(model, x[:4])
    assert [m.training for m in model.modules()] == modes
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert count_batchnorm(model) == 5


class SharedOutput(nn.Module):
    """The conv output feeds the BN *and* a skip: folding would change the skip."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 10)
        randomise_batchnorm(self)

    def forward(self, x):
        h = self.conv(x)
        return self.head((self.bn(h) + h).mean(dim=(2, 3)))


class SharedConv(nn.Module):
    """One conv module called twice, each call followed by its own BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn1, self.bn2, self.head = nn.BatchNorm2d(3), nn.BatchNorm2d(3), nn.Linear(3, 10)
        randomise_batchnorm(self)

    def forward(self, x):
        return self.head(self.bn2(self.conv(self.bn1(self.conv(x)))).mean(dim=(2, 3)))


class NoRunningStats(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean(dim=(2, 3)))


class DataDependent(nn.Module):
    """Control flow on the data: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 10)

    def forward(self, x):
        h = self.bn(self.conv(x))
        if h.mean() > 0:
            h = h * 2
        return self.head(h.mean(dim=(2, 3)))


class _Embedder(nn.Module):
    def __init__(self, body, head):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


class HeldAsAttribute(nn.Module):
    """Like the zoo's CLIP head: ``encoder`` is a plain attribute over registered weights."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 10)
        self.__dict__["encoder"] = _Embedder(self.body, self.head)
        randomise_batchnorm(self)

    def forward(self, x):
        return self.encoder(x) * 2.0


class Unregistered(nn.Module):
    """A plain-attribute module whose weights are registered nowhere: cannot be traced."""

    def __init__(self):
        super().__init__()
        self.__dict__["body"] = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 10)
        self.norm = nn.BatchNorm1d(10)  # something foldable-looking, so the trace is attempted

    def forward(self, x):
        return self.norm(self.head(self.body(x).mean(dim=(2, 3))))


def test_modules_held_as_plain_attributes_are_traced_through():
    model, x = HeldAsAttribute().eval(), _images()
    folded = fold_batchnorm(model, x[:4])
    assert folded is not model and count_batchnorm(folded) == 0
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [SharedOutput, SharedConv, NoRunningStats, DataDependent, Unregistered, nn.Flatten])
def test_what_cannot_be_folded_safely_is_left_as_it_is(cls):
    model = (cls() if cls is not nn.Flatten else nn.Sequential(nn.Flatten(), nn.Linear(192, 10))).eval()
    x = _images(6)
    folded = fold_batchnorm(model, x[:4])
    assert folded is model  # nothing folded: the model itself, not a copy


def test_a_copy_that_disagrees_is_discarded_with_a_warning(monkeypatch):
    def broken(conv, bn):
        out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
        nn.init.zeros_(out.weight)
        return out

    monkeypatch.setattr(uap.fold, "fuse_conv_bn_eval", broken)
    model = BNNet().eval()
    with pytest.warns(RuntimeWarning, match="disagrees"):
        assert fold_batchnorm(model, _images(4)) is model


def test_craft_attacks_the_folded_copy_and_records_it(monkeypatch):
    model, x = BNNet(), _images(24)
    seen = []
    loop = sys.modules["uap.methods.deepfool"]
    real = loop.deepfool

    def recording(m, *a, **k):
        seen.append(m)
        return real(m, *a, **k)

    monkeypatch.setattr(loop, "deepfool", recording)
    pert = craft(model, x, eps=0.05, norm=math.inf, max_passes=2, delta=0.01, seed=0)
    assert pert.passes == 2 and pert.history[0]["updates"] > 0
    assert seen and all(count_batchnorm(m) == 0 for m in seen)
    assert len({id(m) for m in seen}) == 1  # one copy for the whole call, not one per pass
    assert pert.extra["batchnorm_folded"] == 5
    assert model.training  # craft's eval mode is undone as before

    seen.clear()
    plain = craft(model, x, eps=0.05, norm=math.inf, max_passes=2, delta=0.01, seed=0, fold_batchnorm=False)
    assert seen and all(m is model for m in seen)
    assert plain.extra["batchnorm_folded"] == 0
    with pytest.raises(ValueError, match="fold_batchnorm"):
        craft(model, x, eps=0.3, max_passes=1, fold_batchnorm="yes")


@pytest.mark.parametrize("example", [torch.zeros(0, 3, 8, 8), None])
def test_an_empty_or_missing_example_is_a_value_error(example):
    with pytest.raises(ValueError, match="example"):
        fold_batchnorm(BNNet().eval(), example)


def test_targeted_algorithm1_attacks_the_folded_copy_too():
    model, x = BNNet(), _images(24)
    pert = craft(model, x, eps=0.1, norm=math.inf, max_passes=1, seed=0, target=3)
    assert pert.extra["target"] == 3 and pert.extra["batchnorm_folded"] == 5
    assert pert.history[0]["updates"] > 0
