"""Large inputs: bounded-memory projected ascent, and models of different input sizes in one matrix."""
from __future__ import annotations

import numpy as np

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import uap
from uap.adapters.base import AdaptedClassifier
from uap.methods import ascent

torchvision = pytest.importorskip("torchvision")


def _cnn(seed: int, classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(24, classes)).eval()


@pytest.mark.parametrize("method", ["sgd", "feature"])
def test_ascent_in_parts_gives_the_minibatch_gradient(method, monkeypatch):
    """A minibatch over the gradient budget is differentiated in parts: same v as in one piece."""
    net = _cnn(0)
    model = AdaptedClassifier(net, mean=(0.5,) * 3, std=(0.25,) * 3, resize=40, crop=40, interpolation="bilinear",
                              fixed_size=False)
    model.encoder = nn.Sequential(*list(net)[:4])  # features for the label-free method
    x = torch.rand(24, 3, 40, 40)
    kwargs = dict(eps=0.5, norm=2, method=method, max_passes=2, seed=1, method_options={"batch_size": 12})
    whole = uap.craft(model, x, **kwargs).v
    monkeypatch.setattr(ascent, "GRADIENT_BUDGET", 5 * x[0].numel())  # parts of 5, 5 and 2 images
    parts = uap.craft(model, x, **kwargs).v
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-5)
    assert float(whole.norm()) > 0.1


def test_transfer_mixes_input_resolutions(tmp_path):
    """A 32×32 fixed-size model and a torchvision ResNet-18 share 64×64 images: the perturbation
    lives at the images' resolution and a fixed-size model resizes image and perturbation inside."""
    from uap.adapters.torchvision import load as tv_load

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), tmp_path / "r18.pth")
    r18 = tv_load("resnet18", weights=tmp_path / "r18.pth").eval()
    small = AdaptedClassifier(_cnn(1, classes=1000), mean=(0.5,) * 3, std=(0.25,) * 3, resize=32, crop=32,
                              interpolation="bilinear", fixed_size=True).eval()
    x = torch.rand(6, 3, 64, 64)
    with torch.no_grad():  # the 32×32 model sees the 64×64 image resized inside, bilinearly
        resized = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=False)
        torch.testing.assert_close(small(x), small.model((resized - 0.5) / 0.25))
    xc, xe = torch.rand(4, 3, 64, 64), torch.rand(5, 3, 64, 64)
    result = uap.transfer_matrix({"small": small, "r18": r18}, xc, xe, eps=8 / 255, method="sgd", max_passes=1,
                                 baselines="random", batch_size=4)
    assert result.report.fooling_rate.shape == (3, 2)
    assert all(tuple(v.shape) == (3, 64, 64) for v in result.perturbations.values())
    assert not np.isnan(result.report.fooling_rate).any()
    with pytest.raises(ValueError, match="never resized"):
        uap.evaluate({"v": torch.zeros(3, 32, 32)}, {"r18": r18}, xe)


def _folder(root) -> str:
    """An imagefolder of 3 classes × 4 random JPEGs of mixed sizes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(12):
        d = root / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        h, w = [(40, 52), (60, 45), (48, 48)][i % 3]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    return f"imagefolder:{root}"


def _adapted(seed: int, crop: int) -> AdaptedClassifier:
    return AdaptedClassifier(_cnn(seed, classes=3), mean=(0.5,) * 3, std=(0.25,) * 3, resize=crop + 4, crop=crop,
                             interpolation="bilinear", fixed_size=False).eval()


@pytest.mark.parametrize("order", ["small-first", "large-first"])
def test_models_of_different_sizes_each_see_their_own(tmp_path, order):
    """The resolution rule: one image set at the first model's size; a model that declares
    another size resizes the images (and so the perturbation) to its own inside."""
    from uap.inputs import load_inputs

    small, large = _adapted(1, 16), _adapted(2, 24)
    models = {"small": small, "large": large} if order == "small-first" else {"large": large, "small": small}
    lines: list[str] = []
    inputs = load_inputs(models, _folder(tmp_path), n_train=4, n_test=4, log=lines.append)
    first, other = (small, large) if order == "small-first" else (large, small)
    size = first.own_size[0]
    assert tuple(inputs.x.shape[-2:]) == (size, size)
    assert not first.resizes_inside and other.resizes_inside
    assert any(f"{'large' if other is large else 'small'} to {other.own_size[0]}" in line for line in lines)
    x = inputs.x
    with torch.no_grad():
        seen = F.interpolate(x, size=other.own_size, mode="bilinear", align_corners=False, antialias=False)
        torch.testing.assert_close(other(x), other.model((seen - 0.5) / 0.25))
        torch.testing.assert_close(first(x), first.model((x - 0.5) / 0.25))  # the first model: as it was
    v = (torch.rand(3, size, size) * 2 - 1) * (8 / 255)
    inside = F.interpolate(v[None], size=other.own_size, mode="bilinear", align_corners=False, antialias=False)
    assert float(inside.abs().max()) <= float(v.abs().max()) + 1e-7  # resizing never grows ℓ∞


def test_models_of_one_size_are_left_as_they_are(tmp_path):
    """One declared size (or an explicit --image-size for one model): nobody resizes inside."""
    from uap.inputs import load_inputs

    a, b = _adapted(1, 16), _adapted(2, 16)
    load_inputs({"a": a, "b": b}, _folder(tmp_path), n_train=4, log=print)
    assert not a.resizes_inside and not b.resizes_inside
    c = _adapted(3, 24)
    inputs = load_inputs({"c": c}, _folder(tmp_path / "2"), n_train=4, image_size=20)
    assert tuple(inputs.x.shape[-2:]) == (20, 20) and not c.resizes_inside
