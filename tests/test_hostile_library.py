"""Hostile input to the library (RELIABILITY.md): the same mistake is the same ValueError, in the
same words, from every entry point; a model in train mode is attacked in eval mode and given
back as it came."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import uap
from tests.hostile import damaged_safetensors, pickle_payloads, rewrite_metadata
from uap.forward import ModelInputError
from uap.targets import ModelSpecError, Normalized, load_state_dict_file


class Net(nn.Module):
    """Conv → BatchNorm → ReLU → Dropout → Linear on 3×8×8 images, 5 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.drop = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


class ReturnsTuple(Net):
    def forward(self, x):
        return super().forward(x), None


class ReturnsVector(Net):
    def forward(self, x):
        return super().forward(x)[:, 0]


def _net(cls=Net) -> nn.Module:
    torch.manual_seed(0)
    model = cls()
    with torch.no_grad():  # non-trivial running statistics, so a changed one shows
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _images(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))


V = torch.zeros(3, 8, 8)
ENTRY_POINTS = {
    "craft": lambda m, x: uap.craft(m, x, eps=8 / 255, method="sgd", max_passes=1),
    "evaluate": lambda m, x: uap.evaluate({"v": V}, {"m": m}, x),
    "fooling_rate": lambda m, x: uap.fooling_rate(m, x, V),
    "accuracy": lambda m, x: uap.accuracy(m, x, torch.zeros(len(x), dtype=torch.int64) if x.dim() == 4 else x),
    "deepfool": lambda m, x: uap.deepfool(m, x),
}

MISTAKES = {  # mistake: (model class, images, the words every entry point uses)
    "2-D images": (Net, torch.rand(8, 8), r"must have shape N×C×H×W, got \(8, 8\)"),
    "NaN": (Net, _images().index_fill_(0, torch.tensor([2]), float("nan")),
            "has NaN or infinite values: images must be finite, in \\[0, 1\\]"),
    "[0, 255] images": (Net, _images() * 255, r"must be images in \[0, 1\] .*divide 0–255 images by 255"),
    "empty": (Net, torch.rand(0, 3, 8, 8), "is empty: need at least one image"),
    "float64": (Net, _images().double(), "is float64 but the model computes in float32: convert the images"),
    "integer images": (Net, (_images() * 255).to(torch.uint8), "must be a floating-point tensor of images in \\[0, 1\\]"),
    "tuple output": (ReturnsTuple, _images(), r"the model must return logits of shape N×C \(N=\d+ images\), got tuple"),
    "1-D output": (ReturnsVector, _images(), r"the model must return logits of shape N×C \(N=\d+ images\), got \(\d+,\)"),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("mistake", MISTAKES)
def test_the_same_mistake_is_the_same_words_everywhere(entry, mistake):
    cls, x, words = MISTAKES[mistake]
    with pytest.raises(ValueError, match=words):
        ENTRY_POINTS[entry](_net(cls), x)


def test_a_model_of_another_dtype_takes_images_of_its_own():
    model = _net().double()
    assert uap.fooling_rate(model, _images().double(), V.double()) == 0.0
    with pytest.raises(ValueError, match="is float32 but the model computes in float64"):
        uap.fooling_rate(model, _images(), V)


def test_a_model_that_cannot_take_the_images_is_one_error_naming_their_shape():
    x = torch.rand(4, 3, 16, 16)  # Net's linear layer expects 8×8 inputs
    for entry in ("evaluate", "fooling_rate", "deepfool"):
        fn = {"evaluate": lambda: uap.evaluate({"v": torch.zeros(3, 16, 16)}, {"m": _net()}, x),
              "fooling_rate": lambda: uap.fooling_rate(_net(), x, torch.zeros(3, 16, 16)),
              "deepfool": lambda: uap.deepfool(_net(), x)}[entry]
        with pytest.raises(ModelInputError, match=r"the model cannot run on images of shape \(3, 16, 16\)"):
            fn()


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_model_in_train_mode_is_attacked_in_eval_mode_and_given_back_unchanged(entry):
    model = _net()
    model.train()
    model.fc.eval()  # a frozen part inside a training model keeps its own mode
    before = copy.deepcopy(model.state_dict())
    reference = copy.deepcopy(model).eval()
    x = _images()
    torch.manual_seed(5)
    got = ENTRY_POINTS[entry](model, x)
    torch.manual_seed(5)
    expected = ENTRY_POINTS[entry](reference, x)
    assert [m.training for m in model.modules()] == [True, True, True, True, False]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "running statistics or weights changed"
    assert int(after["bn.num_batches_tracked"]) == 0
    # …and the answer is the eval-mode model's (dropout off, running statistics used)
    if entry == "craft":
        assert torch.equal(got.v, expected.v) and got.history[0]["fooling_rate"] == expected.history[0]["fooling_rate"]
    elif entry == "evaluate":
        assert got.fooling_rate.tolist() == expected.fooling_rate.tolist()
    elif entry == "deepfool":
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    else:
        assert got == expected


# ---------------------------------------------------------------------------- files

@pytest.mark.parametrize("kind", ["random", "truncated"])
def test_damaged_safetensors_are_a_value_error_naming_the_file(kind, tmp_path):
    path = damaged_safetensors(tmp_path)[kind]
    with pytest.raises(ValueError, match=f"could not read {path} as safetensors"):
        load_state_dict_file(path)
    with pytest.raises(ValueError, match=f"could not read {path} as safetensors"):
        uap.Perturbation.load(path)


def test_pickles_are_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    for kind, path in pickle_payloads(tmp_path, marker).items():
        with pytest.raises(ValueError, match="could not read"):
            load_state_dict_file(path)
        assert not marker.exists(), kind


def _saved(tmp_path, **edit):
    v = torch.full((3, 4, 4), 0.01)
    path = uap.Perturbation(v=v, eps=0.02, norm="inf").save(tmp_path / "p")
    meta = json.loads(path.with_suffix(".json").read_text())
    return rewrite_metadata(path, json.dumps({**meta, **edit}))


@pytest.mark.parametrize("edit,words", [
    ({"shape": [3, 8, 8]}, r"says shape \[3, 8, 8\] but its tensor is \[3, 4, 4\]"),
    ({"eps": 0.005}, "says eps=0.005 .* but its tensor has ‖v‖_inf = 0.01"),
    ({"norm": "2"}, "says eps=0.02 \\(ℓ2\\) but its tensor has ‖v‖_2 = 0.0692"),
    ({"norm": "p"}, "unknown norm 'p'"),
    ({"eps": -1}, "says eps=-1"),
])
def test_a_perturbation_file_whose_json_contradicts_its_tensor(edit, words, tmp_path):
    with pytest.raises(ValueError, match=words):
        uap.Perturbation.load(_saved(tmp_path, **edit))


def test_a_perturbation_file_that_agrees_with_itself_loads(tmp_path):
    assert uap.Perturbation.load(_saved(tmp_path)).eps == 0.02  # the control of the test above
    assert uap.Perturbation.load(_saved(tmp_path, eps=0.01)).eps == 0.01  # ‖v‖∞ = ε exactly is inside the ball


def test_a_non_finite_perturbation_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"v": torch.full((3, 4, 4), float("nan"))}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match="has NaN or infinite values"):
        uap.Perturbation.load(tmp_path / "nan.safetensors")


# ---------------------------------------------------------------------------- model specs

@pytest.mark.parametrize("mean,std,channels,words", [
    ([0.5, 0.5, 0.5], [0.2, 0.2], None, "mean has 3 values but std has 2"),
    ([float("nan")] * 3, [1.0] * 3, None, "mean values must be finite numbers"),
    ([0.5] * 3, [1.0, float("inf"), 1.0], None, "std values must be finite and > 0"),
    ([0.5] * 3, [1.0, 0.0, 1.0], None, "std values must be finite and > 0"),
    ([], [], None, "at least one value"),
    (["a"], [1.0], None, "sequences of numbers"),
    ([0.5, 0.5], [1.0, 1.0], 3, "2 values but the images have 3 channels"),
])
def test_normalisation_checks(mean, std, channels, words):
    with pytest.raises(ModelSpecError, match=words):
        Normalized.check(mean, std, channels)


def test_a_normalisation_for_other_channels_fails_at_its_first_batch_in_words():
    model = Normalized(nn.Flatten(), [0.5, 0.5], [0.2, 0.2])
    with pytest.raises(ValueError, match="2 values but the images have 3 channels"):
        model(torch.rand(1, 3, 4, 4))
    assert Normalized(nn.Flatten(), [0.5], [0.2])(torch.rand(1, 3, 4, 4)).shape == (1, 48)  # one value for all


def test_a_factory_that_raises_is_one_error():
    from uap.targets import resolve_model

    with pytest.raises(ModelSpecError, match=r"tests.test_hostile_library:_broken_factory\(\) raised RuntimeError: "
                                             "no weights here"):
        resolve_model("tests.test_hostile_library:_broken_factory")


def _broken_factory() -> nn.Module:
    raise RuntimeError("no weights here")


def test_data_seed_and_count_are_checked():
    with pytest.raises(ValueError, match="seed must be an integer ≥ 0, got -1"):
        uap.data.load("cifar10", seed=-1)
    with pytest.raises(ValueError, match="n must be a positive number of images, got 2.5"):
        uap.data.load("cifar10", n=2.5)
