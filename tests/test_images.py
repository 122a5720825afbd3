"""Streamed image sets (uap.images.Images): the same numbers as the float tensor, batch by batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import uap
from uap.data import Preprocessing, load, load_split
from uap.images import Images, as_rows
from uap.runs import tensor_fingerprint


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("UAP_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def folder(tmp_path):
    """A folder of 60 JPEGs of mixed sizes in 3 classes, with train/ and test/ splits: each image
    is noise around its own random colour, so that a random network's predictions vary from image
    to image (on pure noise every image looks alike and every prediction is one class)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 30), ("test", 30)):
        for i in range(count):
            cls = tmp_path / "imgs" / split / f"c{i % 3}"
            cls.mkdir(parents=True, exist_ok=True)
            h, w = int(rng.integers(40, 70)), int(rng.integers(40, 70))
            colour = rng.integers(0, 256, (1, 1, 3))
            pixels = np.clip(colour + rng.integers(-40, 41, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(cls / f"{i}.jpg")
    return tmp_path / "imgs"


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 3))
    return net.eval()


def test_images_index_like_the_tensor():
    pixels = np.random.default_rng(1).integers(0, 256, (10, 5, 6, 3), dtype=np.uint8)
    images, full = Images(pixels), torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    assert images.shape == full.shape and len(images) == 10 and images.dim() == 4
    for index in (slice(2, 7), [7, 1, 1, 4], torch.tensor([9, 0]), np.array([True] * 3 + [False] * 7)):
        assert torch.equal(images[index], full[torch.as_tensor(index)] if not isinstance(index, slice) else full[index])
    assert torch.equal(images[3], full[3])
    sub = as_rows(images, [8, 2, 5])
    assert isinstance(sub, Images) and torch.equal(sub[1:], full[[2, 5]])
    assert tensor_fingerprint(images) == tensor_fingerprint(full)
    with pytest.raises(ValueError, match="uint8"):
        Images(pixels.astype(np.float32))


def test_stream_equals_tensor_path(folder):
    prep = Preprocessing(48, 40)
    data = f"imagefolder:{folder}"
    x, y, classes = load(data, "test", n=24, seed=3, preprocessing=prep)
    xs, ys, _ = load(data, "test", n=24, seed=3, preprocessing=prep, stream=True)
    assert isinstance(xs, Images) and torch.equal(xs.tensor(), x) and torch.equal(ys, y)
    assert isinstance(xs.pixels, np.memmap)  # read from the decoded-image cache, not copied
    models = {"a": _model(0), "b": _model(1)}
    # A colour shift moves the random networks' predictions; zero-mean noise mostly averages out.
    v = torch.tensor([0.3, -0.3, 0.2]).view(3, 1, 1).expand(3, 40, 40).clone()
    noise = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(1)) * 0.4 - 0.2
    rate = uap.fooling_rate(models["a"], x, v, batch_size=7)
    assert 0 < rate < 1  # an equality of zeros with zeros would check nothing
    assert uap.fooling_rate(models["a"], xs, v, batch_size=7) == rate
    assert uap.accuracy(models["b"], xs, ys, v, batch_size=5) == uap.accuracy(models["b"], x, y, v, batch_size=5)
    streamed = uap.evaluate({"v": v}, models, xs, ys, batch_size=5, baselines={"noise": noise})
    plain = uap.evaluate({"v": v}, models, x, y, batch_size=5, baselines={"noise": noise})
    assert ((plain.fooling_rate > 0) & (plain.fooling_rate < 1)).sum() >= 3, plain.fooling_rate
    for field in ("fooling_rate", "accuracy", "dominant_share", "clean_accuracy"):
        assert np.array_equal(getattr(streamed, field), getattr(plain, field), equal_nan=True)


def test_transfer_matrix_on_a_stream(folder, tmp_path):
    prep = Preprocessing(40, 32)
    data = f"imagefolder:{folder}"
    xc, _, _ = load(data, "train", n=15, preprocessing=prep)
    xe, ye, _ = load(data, "test", n=15, preprocessing=prep)
    xs = load_split(data, "test", n=15, preprocessing=prep, stream=True).x
    models = {"a": _model(0), "b": _model(1)}
    kwargs = dict(eps=0.5, method="sgd", max_passes=1, baselines="random", batch_size=4)
    plain = uap.transfer_matrix(models, xc, xe, ye, **kwargs)
    rates = plain.report.fooling_rate
    assert ((rates > 0) & (rates < 1)).sum() >= 2, rates  # not zeros compared with zeros
    streamed = uap.transfer_matrix(models, xc, xs, ye, out_dir=tmp_path / "run", **kwargs)
    assert np.array_equal(rates, streamed.report.fooling_rate)
    again = uap.transfer_matrix(models, xc, load_split(data, "test", n=15, preprocessing=prep, stream=True).x, ye,
                                out_dir=tmp_path / "run", **kwargs)
    assert sorted(again.reused) == ["a", "b"]  # the stream's fingerprint is that of its images
