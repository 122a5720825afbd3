"""uap.targets.resolve_model: user factories, safe weight loading, normalisation, model sources."""
from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from uap import targets
from uap.targets import (ModelSource, ModelSpecError, Normalized, UnknownModelError, load_models, load_state_dict_file,
                         parse_model_list, register_model_source, resolve_model, short_name, split_weights)

REPO = Path(__file__).resolve().parents[1]


def tiny_linear() -> nn.Module:
    """Factory used by the tests below through ``tests.test_targets:tiny_linear``."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))


def test_factory_with_safetensors_weights_and_normalisation(tmp_path):
    reference = tiny_linear()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(1.0)
    save_file(reference.state_dict(), str(tmp_path / "w.safetensors"))
    model, model_id = resolve_model("tests.test_targets:tiny_linear", weights=tmp_path / "w.safetensors",
                                    mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    assert model_id == "tests.test_targets:tiny_linear"
    assert isinstance(model, Normalized) and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    x = torch.rand(2, 3, 4, 4)
    assert torch.allclose(model(x), reference((x - 0.5) / 0.25), atol=1e-6)


def test_torch_state_dict_is_read_weights_only(tmp_path):
    reference = tiny_linear()
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    state = load_state_dict_file(tmp_path / "w.pt")
    assert set(state) == set(reference.state_dict())

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_state_dict_file(tmp_path / "evil.pt")


@pytest.mark.parametrize("spec,kwargs,match", [
    ("no_such_module_xyz:f", {}, "cannot import"),
    ("tests.test_targets:missing", {}, "no attribute"),
    ("tests.test_targets:REPO_CONSTANT", {}, "nn.Module"),
    ("tests.test_targets:tiny_linear", {"mean": [0.5]}, "both mean and std"),
    ("", {}, "empty"),
])
def test_bad_specs(spec, kwargs, match):
    with pytest.raises(ValueError, match=match):
        resolve_model(spec, **kwargs)


def test_weights_that_do_not_fit(tmp_path):
    save_file({"bogus": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="do not fit"):
        resolve_model("tests.test_targets:tiny_linear", weights=tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError):
        resolve_model("tests.test_targets:tiny_linear", weights=tmp_path / "nope.safetensors")


REPO_CONSTANT = 3


# ---------------------------------------------------------------------------- model sources
FAKE_SOURCE = ModelSource(load=lambda name: tiny_linear() if name == "lin" else None, names=lambda: ["lin"],
                          help="lin only")


@pytest.fixture()
def registry(monkeypatch):
    """A fresh registry that sees only the entry points given to it (none by default)."""
    eps: list[importlib.metadata.EntryPoint] = []
    monkeypatch.setattr(targets, "_REGISTRY", targets._Registry(lambda: eps))
    return eps


def test_a_registered_source_resolves_prefixed_and_bare_names(registry):
    register_model_source("tiny", ModelSource(load=lambda n: tiny_linear() if n == "a" else None,
                                              names=lambda: ["a"], bare=True))
    register_model_source("other", ModelSource(load=lambda n: None))
    model, model_id = resolve_model("tiny:a")
    assert model_id == "tiny:a" and isinstance(model, nn.Module) and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert isinstance(resolve_model("a")[0], nn.Module)  # bare: asked of the bare sources
    assert targets.available_models() == {"tiny": ["a"], "other": []}
    with pytest.raises(UnknownModelError, match="'tiny' has no model 'b': tiny has a"):
        resolve_model("tiny:b")
    with pytest.raises(UnknownModelError, match=r"unknown model 'zzz': tiny has a; or SOURCE:NAME with SOURCE one of "
                                                r"tiny, other; or package.module:factory"):
        resolve_model("zzz")
    with pytest.raises(ValueError, match="already registered"):
        register_model_source("tiny", ModelSource(load=lambda n: None))
    with pytest.raises(ValueError, match="model source name"):
        register_model_source("a.b", ModelSource(load=lambda n: None))  # dotted heads stay module:factory


def test_sources_come_from_entry_points_loaded_only_when_needed(registry):
    registry.append(importlib.metadata.EntryPoint("fake", "tests.test_targets:FAKE_SOURCE", targets.ENTRY_POINT_GROUP))
    registry.append(importlib.metadata.EntryPoint("broken", "tests.test_targets:REPO_CONSTANT", targets.ENTRY_POINT_GROUP))
    assert isinstance(resolve_model("fake:lin")[0], nn.Module)
    assert "broken" not in targets._REGISTRY._sources  # not imported: no spec named it
    with pytest.raises(UnknownModelError, match=r"has no model 'nope': fake has lin \(lin only\)"):
        resolve_model("fake:nope")
    with pytest.raises(TypeError, match="not a uap.targets.ModelSource"):
        resolve_model("broken:x")
    register_model_source("fake", ModelSource(load=lambda n: nn.Linear(2, 2)), replace=True)
    assert isinstance(resolve_model("fake:anything")[0], nn.Linear)  # an explicit registration wins


def test_no_source_installed_is_a_clear_error(registry):
    with pytest.raises(UnknownModelError, match="no model source is installed.*'uap.models'"):
        resolve_model("supervised")


def test_messages_name_arguments_not_command_line_options(tmp_path):
    cases = [
        (dict(spec=""), ("spec",)), (dict(spec="tests.test_targets:tiny_linear", mean=[0.5]), ("mean", "std")),
        (dict(spec="tests.test_targets:tiny_linear", mean=[0.5], std=[0.1, 0.2]), ("mean", "std")),
        (dict(spec="tests.test_targets:tiny_linear", mean=[0.5], std=[0.0]), ("std",)),
        (dict(spec="no-such-zoo-model", weights=tmp_path / "w.safetensors"), ("weights",)),
        (dict(spec="no-such-zoo-model"), ("spec",)), (dict(spec="no_such_module_xyz:f"), ("spec",)),
        (dict(spec=":f"), ("spec",)),
    ]
    for kwargs, arguments in cases:
        with pytest.raises(ModelSpecError) as info:
            resolve_model(**kwargs)
        assert info.value.arguments == arguments, kwargs
        assert "--" not in str(info.value), str(info.value)


def test_the_installed_zoo_is_an_entry_point_source():
    import models.zoo

    assert targets.model_sources()["zoo"] is models.zoo.MODEL_SOURCE
    names = models.zoo.available()
    with pytest.raises(UnknownModelError, match="unknown model 'no-such-zoo-model': zoo has"
                                                + (f".*{names[0]}" if names else " no models")):
        resolve_model("no-such-zoo-model")
    if "supervised" in names:
        for spec in ("supervised", "zoo:supervised"):
            model, model_id = resolve_model(spec)
            assert model_id == spec and model.card["name"] == "supervised"


def test_zoo_entries_resolve_by_path(tmp_path, monkeypatch):
    import models.zoo
    from models.probes import ProbedClassifier

    def build(card: dict) -> nn.Module:
        return ProbedClassifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6)), nn.Linear(6, 3))

    models.zoo.get_zoo_builder("probed")  # the built-in builders are in the registry
    monkeypatch.setattr(models.zoo, "_BUILDERS", dict(models.zoo._BUILDERS))  # undone after the test
    models.zoo.register_zoo_builder("test-resolve")(build)
    net = build({})
    models.zoo.save_entry("mine", net, {"builder": "test-resolve"}, zoo_dir=tmp_path)
    model, model_id = resolve_model(str(tmp_path / "mine.safetensors"))
    x = torch.rand(2, 3, 4, 4)
    assert model_id == str(tmp_path / "mine.safetensors") and torch.equal(model(x), net(x))


def test_uap_never_imports_models():
    code = ("import sys, uap\n"
            "from uap.targets import resolve_model\n"
            "resolve_model('tests.test_targets:tiny_linear', mean=[0.5] * 3, std=[0.25] * 3)\n"
            "assert 'models' not in sys.modules, sorted(m for m in sys.modules if m.startswith('models'))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    imports = [f"{p.relative_to(REPO)}: {line.strip()}" for p in (REPO / "uap").rglob("*.py")
               for line in p.read_text().splitlines() if re.match(r"\s*(import|from)\s+models\b", line)]
    assert imports == []


def test_a_lazy_module_is_refused_unless_weights_set_its_shapes(tmp_path):
    with pytest.raises(ModelSpecError, match="shapes are not set yet") as info:
        resolve_model("torch.nn:LazyBatchNorm2d")
    assert info.value.arguments == ("spec",)
    from safetensors.torch import save_file

    state = {"weight": torch.ones(3), "bias": torch.zeros(3), "running_mean": torch.zeros(3),
             "running_var": torch.ones(3), "num_batches_tracked": torch.tensor(0)}
    save_file(state, tmp_path / "w.safetensors")
    model, _ = resolve_model("torch.nn:LazyBatchNorm2d", weights=tmp_path / "w.safetensors")
    assert model(torch.rand(2, 3, 4, 4)).shape == (2, 3, 4, 4)


def test_the_checkout_declares_every_source_once_in_pyproject():
    """pyproject.toml's entry points are the one list of the sources the project ships; a registry
    that reads nothing but the checkout's declarations finds every one of them."""
    import tomllib

    import models.zoo
    from uap.adapters import hub, open_clip, timm, torchvision

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"][targets.ENTRY_POINT_GROUP]
    registry = targets._Registry(targets._checkout_entry_points)
    assert registry.names() == list(declared) == ["zoo", "torchvision", "timm", "open_clip", "hub"]
    for name, source in [("zoo", models.zoo.MODEL_SOURCE), ("torchvision", torchvision.SOURCE),
                         ("timm", timm.SOURCE), ("open_clip", open_clip.SOURCE), ("hub", hub.SOURCE)]:
        assert registry.get(name) is source
    assert targets.source_names()[:len(declared)] == list(declared)  # the running registry: the same, first
    assert not hasattr(__import__("uap.adapters").adapters, "register_adapters")  # no second list


# ---------------------------------------------------------------------------- lists of specs and their labels

@pytest.mark.parametrize("model_id,label", [
    ("supervised", "supervised"), ("supervised@knn", "supervised@knn"), ("pkg.mod:factory", "factory"),
    ("dir/x.safetensors", "x"), ("torchvision:resnet18=r18.pth", "resnet18"),
    ("torchvision:resnet50:IMAGENET1K_V2", "resnet50:IMAGENET1K_V2"), ("timm:vit_tiny_patch16_224", "vit_tiny_patch16_224"),
    ("open_clip:ViT-B-32:openai", "ViT-B-32:openai"), ("hub:/src/dinov2:dinov2_vits14?size=224&probe=knn", "dinov2_vits14"),
    ("hub:../dinov2:dinov2_vits14=w.pth", "dinov2_vits14"), ("zoo:supervised", "supervised"),
    ("runs/sup/perturbation", "perturbation"),
])
def test_short_names_as_every_source_spells_them(model_id, label):
    assert short_name(model_id) == label


def test_split_weights():
    assert split_weights("torchvision:resnet18=r18.pth") == ("torchvision:resnet18", Path("r18.pth"))
    assert split_weights(" a = b=c.pt ") == ("a = b", Path("c.pt"))  # the last '=' splits
    assert split_weights("supervised") == ("supervised", None)
    assert split_weights("hub:d:e?size=224&probe=knn") == ("hub:d:e?size=224&probe=knn", None)  # options, no file
    assert split_weights("hub:d:e?size=224=w.pth") == ("hub:d:e?size=224", Path("w.pth"))
    for item in ("x=", "=w.pth", " = "):
        with pytest.raises(ModelSpecError, match="is not SPEC=WEIGHTS_FILE") as info:
            split_weights(item)
        assert info.value.arguments == ("spec",)


def test_model_lists_all_empty_and_twice(registry):
    register_model_source("tiny", ModelSource(load=lambda n: None, names=lambda: ["a", "b"], bare=True))
    register_model_source("more", ModelSource(load=lambda n: None, names=lambda: ["c"], bare=True))
    register_model_source("prefixed", ModelSource(load=lambda n: None, names=lambda: ["d"]))
    assert parse_model_list(" x , y:z=w.pth,, ") == ["x", "y:z=w.pth"]
    assert parse_model_list("all") == ["a", "b", "c"]  # every model of the bare sources: the zoo
    for text, message in [("", "the model list is empty"), (" , ", "the model list is empty"),
                          ("a,b,a", "the model list names a model twice: a,b,a")]:
        with pytest.raises(ModelSpecError, match=message) as info:
            parse_model_list(text)
        assert info.value.arguments == ("spec",) and "--" not in str(info.value)
    targets._REGISTRY = targets._Registry(lambda: [])
    with pytest.raises(ModelSpecError, match="all: the model zoo has no models yet"):
        parse_model_list("all")


class Checkerboard(nn.Module):
    """A source's model: the mean of the image's even minus odd pixels, scaled, as 2 logits."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x):
        sign = (torch.arange(x.shape[-1]) % 2 * 2 - 1).float()
        s = (x * sign).mean(dim=(1, 2, 3)) * self.scale
        return torch.stack([s, -s], dim=1)


def test_a_new_source_is_one_object_and_one_registration(registry, tmp_path):
    """``boards:SCALE[:TAG]``, labelled ``board-SCALE`` (its own label hook), taking a weights file:
    resolve_model, load_models and short_name work on it with nothing else added."""

    def load(name: str, weights: Path | None = None) -> nn.Module | None:
        scale = name.split(":")[0]
        if not scale.isdigit():
            return None
        model = Checkerboard(float(scale))
        if weights is not None:
            targets.load_weights(model, weights, f"boards:{name}")
        return model

    register_model_source("boards", ModelSource(load=load, names=lambda: ["1", "2"], weights=True,
                                                label=lambda name: f"board-{name.split(':')[0]}"))
    model, model_id = resolve_model("boards:2")
    x = torch.rand(3, 3, 4, 4)
    assert model_id == "boards:2" and torch.equal(model(x), Checkerboard(2.0)(x)) and not model.training
    assert short_name("boards:2:v1=w.pth") == "board-2"
    save_file({"scale": torch.tensor(5.0)}, str(tmp_path / "five.safetensors"))
    specs = parse_model_list(f"boards:2, boards:2:v1, boards:1={tmp_path / 'five.safetensors'}, "
                             "tests.test_targets:tiny_linear")
    loaded = load_models(specs, "cpu")
    assert list(loaded) == ["board-2", "boards:2:v1", "board-1", "tiny_linear"]  # a taken label: the whole spec
    assert float(loaded["board-1"].scale) == 5.0 and all(not m.training for m in loaded.values())
    with pytest.raises(UnknownModelError, match="'boards' has no model 'x': boards has 1, 2"):
        load_models(["boards:x"])
    save_file({"bogus": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelSpecError, match="do not fit boards:1") as info:
        load_models([f"boards:1={tmp_path / 'other.safetensors'}"])
    assert info.value.arguments == ("weights",)


def test_load_models_puts_every_model_on_the_device():
    loaded = load_models(["tests.test_targets:tiny_linear"], torch.device("cpu"))
    assert [p.device.type for p in loaded["tiny_linear"].parameters()] == ["cpu", "cpu"]


# ----------------------------------------------------------------------------- checkpoints as people save them


def _changed_bn_net() -> nn.Module:
    """``tests.tiny_models:bn_net`` with every tensor changed, so that loading it is visible."""
    from tests.tiny_models import bn_net

    net = bn_net()
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.add_(0.5)
    return net


def _same_tensors(model: nn.Module, reference: nn.Module) -> bool:
    ours, theirs = model.state_dict(), reference.state_dict()
    return list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_dataparallel_checkpoint_nested_under_state_dict_loads_unchanged(tmp_path):
    """The library and ``uap craft --model package.module:factory --weights FILE``."""
    reference = _changed_bn_net()
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "state_dict": nn.DataParallel(reference).state_dict(), "best_acc1": 0.5}, path)
    assert all(k.startswith("module.") for k in torch.load(path, weights_only=True)["state_dict"])
    model, _ = resolve_model("tests.tiny_models:bn_net", weights=path)
    assert _same_tensors(model, reference)

    from PIL import Image
    from typer.testing import CliRunner

    import cli

    rng = torch.Generator().manual_seed(0)
    for i in range(10):
        folder = tmp_path / "images" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (32, 32, 3), generator=rng, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    result = CliRunner().invoke(cli.app, [
        "craft", "--model", "tests.tiny_models:bn_net", "--weights", str(path), "--data",
        f"imagefolder:{tmp_path / 'images'}", "--n-images", "4", "--heldout", "0", "--max-passes", "1",
        "--method", "sgd", "--out", str(tmp_path / "run")], env={"UAP_CACHE_DIR": str(tmp_path / "cache")})
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("wrap", ["compiled", "ema", "lightning", "compiled_in_dataparallel"])
def test_wrapped_and_nested_checkpoints_load(wrap, tmp_path):
    reference = _changed_bn_net()
    if wrap == "compiled":  # torch.compile's wrapper (nothing is compiled before a forward pass)
        saved = torch.compile(reference).state_dict()
    elif wrap == "ema":  # timm's training checkpoint: the raw weights and their moving average
        saved = {"state_dict": reference.state_dict(), "state_dict_ema": {}, "optimizer": {"state": {}}}
    elif wrap == "lightning":  # a LightningModule keeps the network as an attribute: "model." in front
        saved = {"state_dict": {f"model.{k}": v for k, v in reference.state_dict().items()}, "epoch": 1}
    else:
        saved = {"model": nn.DataParallel(torch.compile(reference)).state_dict()}
    torch.save(saved, tmp_path / "w.pth")
    model, _ = resolve_model("tests.tiny_models:bn_net", weights=tmp_path / "w.pth")
    assert _same_tensors(model, reference)


def test_another_projects_names_for_the_same_tensors_load_by_position(tmp_path):
    reference = _changed_bn_net()
    foreign = {f"_layer{i}.{k.rpartition('.')[2]}": v for i, (k, v) in enumerate(reference.state_dict().items())}
    torch.save(foreign, tmp_path / "foreign.pth")
    model, _ = resolve_model("tests.tiny_models:bn_net", weights=tmp_path / "foreign.pth")
    assert _same_tensors(model, reference)

    keys = list(foreign)  # a batch norm's weight and bias swapped: same shapes, other roles
    bn = next(i for i, k in enumerate(keys) if k.endswith(".weight") and keys[i + 1].endswith(".bias")
              and foreign[k].dim() == 1)
    keys[bn], keys[bn + 1] = keys[bn + 1], keys[bn]
    torch.save({k: foreign[k] for k in keys}, tmp_path / "swapped.pth")
    with pytest.raises(ModelSpecError) as info:
        resolve_model("tests.tiny_models:bn_net", weights=tmp_path / "swapped.pth")
    expected = list(reference.state_dict())[bn]
    assert str(info.value).endswith(
        f"do not fit tests.tiny_models:bn_net (the file names its tensors in another layout, and matched by position "
        f"they differ: the first out of place is {keys[bn]} [8] in the file where the model has {expected} [8])")


def test_weights_that_do_not_fit_name_the_first_missing_and_unexpected_tensor(tmp_path):
    state = _changed_bn_net().state_dict()
    state = {("module." + k if k != "out.weight" else "module.head.weight"): v for k, v in state.items()}
    torch.save({"model_state_dict": state}, tmp_path / "w.pth")
    with pytest.raises(ModelSpecError) as info:
        resolve_model("tests.tiny_models:bn_net", weights=tmp_path / "w.pth")
    message = str(info.value)
    assert message.endswith(
        "do not fit tests.tiny_models:bn_net (weights of another architecture?; compared after removing the "
        "prefixes module.): missing out.weight [10, 12]; unexpected head.weight [10, 12]"), message
    state = {k.replace("module.head.", "module.out."): (v[:5] if k.startswith("module.head") else v)
             for k, v in state.items()}
    state["module.out.bias"] = state["module.out.bias"][:5]
    torch.save(state, tmp_path / "classes.pth")
    with pytest.raises(ModelSpecError, match=r"\(the same names with other shapes: another variant or number of "
                       r"classes\?\): out.weight is \[5, 12\] in the "
                       r"file, \[10, 12\] in the model \(and 1 more\)$"):
        resolve_model("tests.tiny_models:bn_net", weights=tmp_path / "classes.pth")
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "no-tensors.pth")
    with pytest.raises(ModelSpecError, match="does not hold a state dict \\(its keys: epoch, optimizer: the tensors"):
        resolve_model("tests.tiny_models:bn_net", weights=tmp_path / "no-tensors.pth")
