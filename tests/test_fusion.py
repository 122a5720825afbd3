"""BatchNorm folding for attacks: same function, fewer modules, safe fallbacks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from uap import craft
from uap.fusion import fold_batchnorm


def _bn_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    model.train()
    with torch.no_grad():  # give the BN layers non-trivial running statistics
        for _ in range(5):
            model(torch.rand(32, 3, 8, 8))
    return model.eval()


def test_folded_copy_computes_the_same_function_without_batchnorm():
    model = _bn_cnn()
    x = torch.rand(16, 3, 8, 8)
    folded = fold_batchnorm(model, check=x[:4])
    assert folded is not model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_(True)
    xf = x.clone().requires_grad_(True)
    (gm,) = torch.autograd.grad(model(xg)[:, 3].sum(), xg)
    (gf,) = torch.autograd.grad(folded(xf)[:, 3].sum(), xf)
    torch.testing.assert_close(gf, gm, rtol=1e-4, atol=1e-6)


def test_models_without_batchnorm_or_untraceable_are_returned_as_is():
    plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    assert fold_batchnorm(plain) is plain

    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _bn_cnn()

        def forward(self, x):
            if x.sum() > 0:  # torch.fx cannot trace a branch on a tensor value
                return self.net(x)
            return -self.net(x)

    model = DataDependent().eval()
    with pytest.warns(RuntimeWarning, match="folding skipped"):
        assert fold_batchnorm(model) is model


def test_craft_with_and_without_folding_agree():
    model = _bn_cnn(1)
    x = torch.rand(24, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(eps=0.1, norm="inf", max_passes=1, seed=0)
    folded = craft(model, x, fold_bn=True, **kwargs)
    plain = craft(model, x, fold_bn=False, **kwargs)
    assert craft(model, x, **kwargs).extra["fold_bn"] is False  # exact Algorithm 1: off by default
    assert craft(model, x, method="deepfool-batched", **kwargs).extra["fold_bn"] is True
    assert folded.extra["fold_bn"] is True and plain.extra["fold_bn"] is False
    assert folded.history[-1]["updates"] == plain.history[-1]["updates"] > 0
    torch.testing.assert_close(folded.v, plain.v, rtol=1e-3, atol=1e-4)
