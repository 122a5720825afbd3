"""Results that cannot be right say so: one ``warning:`` line each, never silent, never fatal,
no number changed. Also: 16-bit and float images, ``.tif`` files and skipped files; why crafting
stopped; an interrupted ``uap craft``; batch-norm folding through the normalisation wrapper."""
from __future__ import annotations

import json
import shlex
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import uap
from cli import app
from tests.cifar_resnet import MEAN, STD, resnet_small, trained_state
from tests.hostile import stderr_of
from tests.tiny_models import BNNet, tiny_linear
from uap import data
from uap.evaluate import check_clean_accuracy, evaluate
from uap.fold import count_batchnorm, fold_batchnorm
from uap.inputs import load_inputs
from uap.runs import craft_run
from uap.targets import Normalized, resolve_model

runner = CliRunner()


def _warned(call, *args, **kwargs) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = call(*args, **kwargs)
    return out, [str(w.message) for w in caught]


@pytest.fixture()
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("UAP_CACHE_DIR", str(tmp_path / "cache"))


def _folder(root, layout: dict[str, dict[str, int]], size: int = 8):
    """``root/split/class/i.png`` random RGB images, ``layout[split][class]`` of them."""
    rng = np.random.default_rng(0)
    for split, classes in layout.items():
        for cls, n in classes.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


# --------------------------------------------------------------------------- normalisation on the wrong scale

def test_mean_std_above_one_warn_and_change_nothing():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.rand(2, 3, 2, 2)
    model, said = _warned(Normalized, net, [125.0, 120.0, 110.0], [60.0, 60.0, 60.0])
    assert len(said) == 1 and "values above 1" in said[0] and "[0, 1] scale" in said[0]
    mean, std = torch.tensor([125.0, 120.0, 110.0]).view(1, 3, 1, 1), torch.tensor(60.0)
    assert torch.equal(model(x), net((x - mean) / std))
    _, said = _warned(resolve_model, "tests.cifar_resnet:resnet_small", mean=[0.485, 0.456, 0.406], std=[0.229] * 3)
    assert said == []


def test_clean_accuracy_at_chance_warns_in_evaluate_and_craft(data_root):
    """The 0–255 normalisation of the issue: the model sits at chance, and both places that
    measure a clean accuracy say so; the right normalisation says nothing."""
    x, y, classes = data.load("cifar10", "test", n=300, seed=0)
    net = resnet_small()
    net.load_state_dict(trained_state())
    right, wrong = Normalized(net, MEAN, STD).eval(), _warned(Normalized, net, [124.0, 116.0, 104.0], [58.0] * 3)[0].eval()
    v = {"zero": torch.zeros(3, 32, 32)}
    report, said = _warned(evaluate, v, {"right": right, "wrong": wrong}, x, y, classes=classes)
    chance = [s for s in said if "no better than chance" in s]
    assert len(chance) == 1 and chance[0].startswith("wrong:") and "normalisation" in chance[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet = evaluate(v, {"right": right, "wrong": wrong}, x, y, classes=classes)
    assert np.array_equal(report.clean_accuracy, quiet.clean_accuracy) and report.clean_accuracy[1] <= 0.15
    assert check_clean_accuracy(0.5, 10, 300) is False


def test_craft_with_mean_std_on_the_wrong_scale_warns_and_finishes(tmp_path, data_root):
    weights = tmp_path / "w.pth"
    torch.save(trained_state(), weights)
    result = runner.invoke(app, ["craft", "--model", "tests.cifar_resnet:resnet_small", "--weights", str(weights),
                                 "--mean", "123.7,116.3,103.5", "--std", "58.4,57.1,57.4", "--n-images", "10",
                                 "--heldout", "200", "--max-passes", "1", "--out", str(tmp_path / "run"),
                                 "--data-root", str(data_root)])
    assert result.exit_code == 0, result.output
    err = stderr_of(result)
    lines = [line for line in err.splitlines() if line.startswith("warning:")]
    assert any("values above 1" in line for line in lines), err
    assert any("no better than chance" in line and "normalisation" in line for line in lines), err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["clean_heldout_accuracy"] <= 0.15  # measured and written as ever


# --------------------------------------------------------------------------- classes that are not the model's

def test_classes_that_are_not_the_models_warn(tmp_path, cache):
    root = _folder(tmp_path / "catdog", {"train": {"cat": 3, "dog": 3}, "test": {"cat": 2, "dog": 2}}, size=32)
    ten = tiny_linear()
    _, said = _warned(load_inputs, {"cifar-model": ten}, f"imagefolder:{root}", n_test=4)
    assert len(said) == 1 and "cifar-model gives 10 logits but the data has 2 classes" in said[0]

    two = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2))
    two.classes = ("airplane", "automobile")
    _, said = _warned(load_inputs, {"named": two}, f"imagefolder:{root}", n_test=4)
    assert len(said) == 1 and "named's classes (airplane, automobile) are not the data's (cat, dog)" in said[0]
    for same in (("cat", "dog"), ("Cat", "dog_")):  # the same labels, one spelt otherwise: nothing to say
        two.classes = same
        _, said = _warned(load_inputs, {"named": two}, f"imagefolder:{root}", n_test=4)
        assert said == []


def test_train_and_test_with_other_classes_warn(tmp_path, cache):
    root = _folder(tmp_path / "d", {"train": {"cat": 3, "dog": 3}, "test": {"cat": 2, "fox": 2}}, size=32)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2))
    inputs, said = _warned(load_inputs, [model], f"imagefolder:{root}", n_train=6, n_test=4)
    assert len(said) == 1 and "only in train: dog; only in test: fox" in said[0]
    assert inputs.classes == ("cat", "fox")  # the held-out split's classes, as before


# --------------------------------------------------------------------------- images

def test_16_bit_and_float_images_are_scaled_and_tif_is_read(tmp_path, cache):
    root = tmp_path / "wide"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(root / "train" / "a" / "half16.png")
    Image.fromarray(np.full((4, 4), 0.25, dtype=np.float32)).save(root / "train" / "a" / "quarter.tif")
    Image.fromarray(np.full((4, 4, 3), 200, dtype=np.uint8)).save(root / "train" / "b" / "rgb.tiff")
    for cls in ("a", "b"):
        Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(root / "test" / cls / "0.png")
    (root / "train" / "b" / "notes.txt").write_text("not an image")
    (root / "train" / "b" / "anim.gif").write_bytes(b"GIF89a")
    (root / "train" / "b" / ".DS_Store").write_bytes(b"\0")
    assert Image.open(root / "train" / "a" / "half16.png").mode.startswith("I")
    (x, y, _), said = _warned(data.load, f"imagefolder:{root}", "train")
    assert [round(float(v) * 255) for v in x[:, 0, 0, 0]] == [128, 64, 200]  # half16, quarter, rgb
    assert (x[:, 0] == x[:, 1]).all() and y.tolist() == [0, 0, 1]
    assert len(said) == 1 and "skipped 2 entries that are not images (1 .gif, 1 .txt)" in said[0]


# --------------------------------------------------------------------------- why crafting stopped

def test_the_summary_says_why_crafting_stopped(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(12, 3, 32, 32)
    run = craft_run(tmp_path / "delta", tiny_linear(), x, eps=0.5, max_passes=5, delta=0.2).summary
    reached, k = run["stopped"], run["passes"]
    assert reached["reason"] == "delta" and reached["pass"] == k < 5 and run["fooling_rate"] > 0.8
    assert f"> 1 − δ = 80 % after pass {k} (of at most 5)" in reached["text"]
    ran_all = craft_run(tmp_path / "all", tiny_linear(), x, eps=1 / 255, max_passes=2, delta=0.0).summary["stopped"]
    assert ran_all["reason"] == "max_passes" and ran_all["pass"] == 2 and "all 2 passes ran" in ran_all["text"]
    stopped = craft_run(tmp_path / "cb", tiny_linear(), x, eps=1 / 255, max_passes=3, delta=0.0,
                        callback=lambda e: e["event"] == "pass").summary["stopped"]
    assert stopped["reason"] == "callback" and stopped["pass"] == 1


# --------------------------------------------------------------------------- an interrupted craft

def test_an_interrupted_craft_says_how_to_resume(tmp_path, data_root, monkeypatch):
    import uap.universal

    out = tmp_path / "run"
    args = ["craft", "--model", "tests.tiny_models:tiny_linear", "--n-images", "12", "--heldout", "10",
            "--max-passes", "3", "--delta", "0.001", "--out", str(out), "--data-root", str(data_root)]
    real_craft = uap.universal.craft

    def craft_then_ctrl_c(*a, callback, **kw):
        def interrupt_after_pass_1(event):
            answer = callback(event)
            if event["event"] == "pass":
                raise KeyboardInterrupt
            return answer

        return real_craft(*a, callback=interrupt_after_pass_1, **kw)

    monkeypatch.setattr(uap.universal, "craft", craft_then_ctrl_c)
    interrupted = runner.invoke(app, args)
    monkeypatch.undo()
    assert interrupted.exit_code == 130 and not isinstance(interrupted.exception, KeyboardInterrupt)
    lines = [line for line in stderr_of(interrupted).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted: the passes finished so far are kept"), lines
    command = shlex.split(lines[0].split("`")[1])
    assert command[0] == "uap" and command[-1] == "--resume" and command[1:-1] == args
    resumed = runner.invoke(app, command[1:])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming after pass 1 from" in resumed.output and "stopped" in resumed.output


# --------------------------------------------------------------------------- folding through the wrapper

def test_batchnorm_folds_through_the_normalisation_wrapper():
    net = BNNet(size=8).eval()
    model = Normalized(net, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).eval()
    x = torch.rand(4, 3, 8, 8)
    folded = fold_batchnorm(model, x)
    assert folded is not model and count_batchnorm(model) == 5 and count_batchnorm(folded) == 0
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5, rtol=1e-4)


def test_craft_attacks_the_folded_copy_of_a_normalised_model(data_root):
    x, _, _ = data.load("cifar10", "train", n=8, seed=0)
    model, _ = resolve_model("tests.tiny_models:bn_net", mean=[0.5] * 3, std=[0.25] * 3)
    pert = uap.craft(model, x, eps=8 / 255, max_passes=1)
    assert pert.extra["batchnorm_folded"] == 5
