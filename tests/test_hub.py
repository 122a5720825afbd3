"""hub:DIR:ENTRY: a backbone from a local torch.hub repository, with a probe fitted on labelled images."""
from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import cli
import uap
from uap.data import load
from uap.targets import ModelSpecError, resolve_model

HUBCONF = '''
dependencies = ["torch"]
import torch
from torch import nn


def tiny_backbone(pretrained=False, width=8):
    """A small conv backbone: images → width features (DINOv2-style: returns the pooled features)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
'''


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("UAP_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def repo(tmp_path):
    folder = tmp_path / "tinyhub"
    folder.mkdir()
    (folder / "hubconf.py").write_text(textwrap.dedent(HUBCONF))
    return folder


@pytest.fixture
def images(tmp_path):
    """40 JPEGs in 2 classes (bright and dark), one split folder: the split rule divides them."""
    rng = np.random.default_rng(0)
    for i in range(40):
        cls = tmp_path / "imgs" / ("bright" if i % 2 else "dark")
        cls.mkdir(parents=True, exist_ok=True)
        base = 180 if i % 2 else 60
        Image.fromarray(rng.integers(base - 50, base + 50, (48, 56, 3)).astype(np.uint8)).save(cls / f"{i}.jpg")
    return tmp_path / "imgs"


def test_backbone_as_encoder_and_probes(repo, images):
    model, _ = resolve_model(f"hub:{repo}:tiny_backbone?size=32&resize=36")
    assert model.preprocessing["crop"] == 32 and model.preprocessing["resize"] == 36
    prep = uap.data.Preprocessing.of(model)
    x, y, classes = load(f"imagefolder:{images}", "train", preprocessing=prep, stream=True)
    hx, hy, _ = load(f"imagefolder:{images}", "test", preprocessing=prep)
    with pytest.raises(ValueError, match="fit_probe"):
        model(hx)
    model.fit_probe(x, y, classes)
    # the backbone behind the resize and ImageNet normalisation is the encoder
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(),
                                    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(hx), reference((hx - mean) / std))
        assert model(hx).shape == (len(hx), 2)
    assert uap.accuracy(model, hx, hy) >= 0.9  # bright vs dark is linearly separable in the features
    knn, _ = resolve_model(f"hub:{repo}:tiny_backbone?size=32&probe=knn&k=5")
    knn.fit_probe(x, y, classes)
    assert uap.accuracy(knn, hx, hy) >= 0.9


def test_weights_file_and_errors(repo, tmp_path):
    from safetensors.torch import save_file

    state = {k: torch.full_like(v, 0.01) for k, v in torch.hub.load(str(repo), "tiny_backbone", source="local").state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    model, _ = resolve_model(f"hub:{repo}:tiny_backbone", weights=tmp_path / "w.safetensors")
    assert torch.equal(model.encoder.model[0].weight, state["0.weight"])
    save_file({"0.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    for spec, weights, message in [
        (f"hub:{repo}:nope", None, "has no entry 'nope'; it has tiny_backbone"),
        (f"hub:{tmp_path}:tiny_backbone", None, "has no hubconf.py"),
        (f"hub:{tmp_path / 'missing'}:tiny_backbone", None, "does not exist"),
        (f"hub:{repo}:tiny_backbone?probe=svm", None, "probe must be one of"),
        (f"hub:{repo}:tiny_backbone?size=big", None, "positive integer"),
        (f"hub:{repo}:tiny_backbone", tmp_path / "bad.safetensors", "do not fit"),
    ]:
        with pytest.raises(ModelSpecError, match=message):
            resolve_model(spec, weights=weights)


def test_cli_fits_the_probe_on_the_crafting_side(repo, images, tmp_path):
    runner = CliRunner()
    spec = f"hub:{repo}:tiny_backbone?size=32&resize=36"
    result = runner.invoke(cli.app, ["craft", "--model", spec, "--data", f"imagefolder:{images}", "--n-images", "8",
                                     "--heldout", "4", "--method", "sgd", "--max-passes", "1", "--eps", "8/255",
                                     "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "fitting the probe of 1 hub model(s) on" in result.output and "train images" in result.output
    from uap.targets import load_models, parse_model_list

    loaded = load_models(parse_model_list(f"{spec},{spec.replace('36', '40')}"))  # query options, no weights file
    assert list(loaded) == ["tiny_backbone", spec.replace("36", "40")]
    assert [m.preprocessing["resize"] for m in loaded.values()] == [36, 40]
    bad = runner.invoke(cli.app, ["craft", "--model", f"hub:{tmp_path}:tiny_backbone", "--data", f"imagefolder:{images}",
                                  "--out", str(tmp_path / "run2")])
    assert bad.exit_code == 2 and "hubconf.py" in bad.output and "Traceback" not in bad.output
