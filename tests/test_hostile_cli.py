"""Hostile input to the command line (RELIABILITY.md): each is one line on stderr, exit code 2,
no traceback, nothing written, and, where the input alone shows the mistake, refused before
any model or data is loaded."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli
from tests.hostile import MODEL, damaged_safetensors, invoke, one_line_error, pickle_payloads, rewrite_metadata
from tests.launch import uap_command
from uap import Perturbation

SMALL = ["--n-images", "12", "--heldout", "10", "--max-passes", "1", "--method", "sgd"]


@pytest.fixture()
def nothing_loads(monkeypatch):
    """Fail the test if the command gets as far as loading a model or data."""
    import uap.data
    import uap.targets

    def must_not_run(*args, **kwargs):
        raise AssertionError("loaded a model or data before refusing the input")

    monkeypatch.setattr(uap.targets, "resolve_model", must_not_run)
    monkeypatch.setattr(uap.data, "load", must_not_run)


@pytest.fixture()
def out(tmp_path) -> Path:
    return tmp_path / "out"


def _refused(out: Path, *args: str) -> str:
    line = one_line_error(invoke(*args))
    assert not out.exists(), "a refused command wrote its output folder"
    return line


# ---------------------------------------------------------------------------- parsed before any work

@pytest.mark.parametrize("args,words", [
    (["--eps", "0"], "--eps '0': eps must be a finite number > 0"),
    (["--eps", "-1"], "--eps '-1': eps must be a finite number > 0"),
    (["--eps", "nan"], "--eps 'nan': eps must be a finite number > 0"),
    (["--eps", "inf"], "--eps 'inf': eps must be a finite number > 0"),
    (["--eps", "1e999"], "--eps '1e999': eps must be a finite number > 0"),
    (["--eps", "abc"], "--eps must be a number or a fraction like 8/255, got 'abc'"),
    (["--eps", "1/0"], "--eps must be a number or a fraction like 8/255, got '1/0'"),
    (["--eps", "300/255"], "the [0, 1] pixel scale"),
    (["--norm", "l3"], "--norm must be inf, 2 or 1"),
    (["--delta", "nan"], "--delta: delta must be in [0, 1)"),
    (["--delta", "1"], "--delta: delta must be in [0, 1)"),
    (["--n-images", "0"], "--n-images: method sgd with these options needs crafting images"),
    (["--n-images", "abc"], "Invalid value for '--n-images'"),
    (["--heldout", "-1"], "Invalid value for '--heldout'"),
    (["--max-passes", "0"], "--max-passes: max_passes must be an integer ≥ 1"),
    (["--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["--seed", "-1"], "Invalid value for '--seed'"),
    (["--target", "-1"], "Invalid value for '--target'"),
    (["--image-size", "0"], "Invalid value for '--image-size'"),
    (["--resize", "-3"], "Invalid value for '--resize'"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--method-option", "step_size=nan"], "step_size"),
    (["--method-option", "step_size=-1"], "step_size must be a finite number > 0"),
    (["--method-option", "=3"], "--method-option must look like KEY=VALUE"),
    (["--precision", "fp16"], "--precision"),
    (["--mean", "0.5,0.5,0.5", "--std", "0.2,0.2"], "--mean and --std: mean has 3 values but std has 2"),
    (["--mean", "0.5,0.5", "--std", "0.2,0.2"], "the images have 3 channels"),
    (["--mean", "nan,0.5,0.5", "--std", "1,1,1"], "--mean: mean values must be finite numbers"),
    (["--mean", "0.5,0.5,0.5", "--std", "1,0,1"], "--std: std values must be finite and > 0"),
    (["--mean", "a,b,c", "--std", "1,1,1"], "--mean must be comma-separated numbers"),
    (["--device", "meta"], "--device must be cpu, cuda or cuda:N, got 'meta'"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
    (["--device", "cuda:x"], "--device must be cpu, cuda or cuda:N"),
    (["--no-such-option", "1"], "No such option: --no-such-option"),
    (["--model"], "Option '--model' requires an argument"),
])
def test_craft_refuses_bad_options_before_any_work(args, words, out, nothing_loads):
    line = _refused(out, "craft", "--model", MODEL, *SMALL, "--out", str(out), *args)
    assert words in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_craft_on_cuda_without_a_gpu_is_one_line_before_any_work(device, out, nothing_loads):
    line = _refused(out, "craft", "--model", MODEL, *SMALL, "--out", str(out), "--device", device)
    assert line == f"error: --device {device}: CUDA is not available on this machine", line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_craft_on_cuda_without_a_gpu_through_the_console_entry(out):
    """The installed command's path (``cli.main``, which picks the process group's backend from
    ``--device``) ends in the same one line."""
    import os
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "COLUMNS": "200"}
    done = subprocess.run([*uap_command(), "craft", "--model", MODEL, *SMALL, "--out", str(out), "--device", "cuda"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert [line for line in done.stderr.splitlines() if line.strip()] == [
        "error: --device cuda: CUDA is not available on this machine"], done.stderr[-2000:]
    assert not out.exists()


@pytest.mark.parametrize("args,words", [
    (["evaluate", "p.safetensors", "--n-images", "0"], "Invalid value for '--n-images'"),
    (["evaluate", "p.safetensors", "--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["evaluate", "p.safetensors", "--baselines", "[/]"], "--baselines: unknown baseline '[/]'"),
    (["transfer", "--eps", "nan"], "--eps 'nan': eps must be a finite number > 0"),
    (["transfer", "--norm", "3"], "--norm must be inf, 2 or 1"),
    (["transfer", "--n-craft", "0"], "Invalid value for '--n-craft'"),
    (["transfer", "--models", ""], "--models: the model list is empty"),
    (["transfer", "--models", f"{MODEL},{MODEL}"], "--models: the model list names a model twice"),
    (["crft"], "No such command 'crft'"),
])
def test_evaluate_and_transfer_refuse_bad_options_before_any_work(args, words, out, nothing_loads):
    line = _refused(out, *args, "--out", str(out))
    assert words in line, line


@pytest.mark.parametrize("args,words", [
    (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
    (["--weight-decay", "-1"], "weight_decay must be a finite number ≥ 0, got -1.0"),
    (["--warmup-epochs", "inf"], "warmup_epochs must be a finite number ≥ 0, got inf"),
])
def test_train_refuses_non_finite_hyper_parameters_before_any_work(args, words, out, nothing_loads):
    line = _refused(out, "train", "supervised", "--epochs", "1", "--out", str(out), *args)
    assert words in line, line


@pytest.mark.parametrize("args,words", [
    (["--delta", "2"], "delta must be in [0, 1)"), (["--max-passes", "0"], "max_passes must be an integer ≥ 1"),
    (["--method", "nope"], "unknown method 'nope'"),
])
def test_transfer_refuses_a_bad_stop_rule_or_method_before_any_work(args, words, out, nothing_loads):
    line = _refused(out, "transfer", "--models", MODEL, "--out", str(out), *args)
    assert words in line, line


def test_transfer_matrix_refuses_them_before_touching_out_dir(out):
    """The library's own check (uap.transfer_matrix), for callers that skip the CLI."""
    from tests.tiny_models import tiny_linear
    from uap import transfer_matrix

    x = torch.rand(4, 3, 32, 32)
    for kwargs in ({"delta": 2.0}, {"max_passes": 0}, {"method": "nope"}):
        with pytest.raises(ValueError):
            transfer_matrix({"m": tiny_linear()}, x, x.clone(), eps=8 / 255, out_dir=out, **kwargs)
        assert not out.exists()


# ---------------------------------------------------------------------------- user values, literally

@pytest.mark.parametrize("args,shown", [
    (["--eps", "[/]"], "'[/]'"),
    (["--eps", "[bold red]1"], "'[bold red]1'"),
    (["--device", "[red]"], "'[red]'"),
    (["--eps", "1\x1b[2J/255"], r"'1\x1b[2J/255'"),
    (["--eps", "1\x07\r/255"], r"'1\x07\r/255'"),
    (["--eps", "8/255\n--eps 1"], r"'8/255\n--eps 1'"),
])
def test_markup_and_control_characters_are_printed_literally(args, shown, out, nothing_loads):
    line = _refused(out, "craft", "--model", MODEL, "--out", str(out), *args)
    assert shown in line, line


@pytest.mark.parametrize("spec,shown", [
    ("[/x]", "'[/x]'"), ("[bold]x", "'[bold]x'"), ("a\x1b[31mb\u202ec", r"'a\x1b[31mb\u202ec'"),
])
def test_model_specs_are_printed_literally(spec, shown, out):
    line = _refused(out, "craft", "--model", spec, "--out", str(out))
    assert shown in line and "unknown model" in line, line


def test_a_control_character_in_a_path_is_escaped(tmp_path, out):
    line = _refused(out, "craft", "--model", MODEL, "--data", f"imagefolder:{tmp_path}/x\x1b]0;pwned\x07y",
                    "--out", str(out))
    assert r"x\x1b]0;pwned\x07y does not exist" in line, line


# ---------------------------------------------------------------------------- models and weights

@pytest.mark.parametrize("spec,words", [
    ("torch.nn:Conv2d", "cannot be called without arguments"),
    ("json:loads", "cannot be called without arguments"),
    ("os:sep", "neither an nn.Module nor a factory to call"),
    ("os:getcwd", "did not give an nn.Module (got str)"),
    ("no_such_module_xyz:factory", "cannot import 'no_such_module_xyz'"),
    ("tests.tiny_models:no_such_factory", "has no attribute 'no_such_factory'"),
    ("torch.nn:LazyBatchNorm2d", "has parameters whose shapes are not set yet"),
    ("torch.nn:LazyInstanceNorm1d", "has parameters whose shapes are not set yet"),
])
def test_model_specs_that_are_not_factories(spec, words, out):
    line = _refused(out, "craft", "--model", spec, *SMALL, "--out", str(out))
    assert line.startswith("error: --model: ") and words in line, line


def test_help_says_a_factory_spec_runs_user_code():
    for command in ("craft", "evaluate", "transfer"):
        text = " ".join(invoke(command, "--help").output.replace("│", " ").split())
        assert "imports that module and calls factory() with no arguments" in text, command
        assert "name only code you trust" in text, command


@pytest.mark.parametrize("kind", ["random", "truncated"])
def test_damaged_safetensors_weights(kind, tmp_path, out):
    path = damaged_safetensors(tmp_path)[kind]
    line = _refused(out, "craft", "--model", MODEL, *SMALL, "--weights", str(path), "--out", str(out))
    assert line.startswith("error: --weights: could not read") and str(path) in line, line
    zero = Perturbation(v=torch.zeros(3, 32, 32), eps=8 / 255).save(tmp_path / "zero")
    line = _refused(out, "evaluate", str(zero), "--models", f"{MODEL}={path}", "--out", str(out))
    assert "could not read" in line and str(path) in line, line


def test_damaged_zoo_checkpoint(tmp_path, out):
    import models.zoo

    card = json.loads((models.zoo.ZOO_DIR / "supervised.json").read_text())
    damaged_safetensors(tmp_path)["random"].rename(tmp_path / "mine.safetensors")
    (tmp_path / "mine.json").write_text(json.dumps(card))  # the card's sha256 does not match
    line = _refused(out, "craft", "--model", str(tmp_path / "mine.safetensors"), *SMALL, "--out", str(out))
    assert "does not match the sha256" in line, line
    card.pop("sha256")  # without a checksum the weights cannot be verified: refused before reading them
    (tmp_path / "mine.json").write_text(json.dumps(card))
    line = _refused(out, "craft", "--model", str(tmp_path / "mine.safetensors"), *SMALL, "--out", str(out))
    assert "has no valid sha256" in line and "mine.safetensors" in line, line
    (tmp_path / "mine.json").write_text("{not json")
    line = _refused(out, "craft", "--model", str(tmp_path / "mine.safetensors"), *SMALL, "--out", str(out))
    assert "is not valid JSON" in line, line


def test_a_pickle_disguised_as_weights_never_runs(tmp_path, out):
    marker = tmp_path / "pwned"
    files = pickle_payloads(tmp_path, marker)
    import pickletools

    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(files["raw"].read_bytes())]
    # the payload is real, read without running it: loading it calls builtins.open on the marker …
    assert "REDUCE" in [name for name, _ in ops] and "open" in [arg for _, arg in ops], ops
    assert str(marker) in [arg for _, arg in ops] and not marker.exists()
    for kind, path in files.items():  # … and no weights path in the tool unpickles it
        line = _refused(out, "craft", "--model", MODEL, *SMALL, "--weights", str(path), "--out", str(out))
        assert "--weights: could not read" in line and str(path) in line, (kind, line)
        assert not marker.exists(), f"the {kind} pickle ran"


def test_weights_for_another_architecture(tmp_path, out):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(10, 3 * 32 * 32), "bias": torch.zeros(10)}, str(tmp_path / "linear.safetensors"))
    line = _refused(out, "craft", "--model", "tests.tiny_models:bn_net", *SMALL,
                    "--weights", str(tmp_path / "linear.safetensors"), "--out", str(out))
    assert "do not fit tests.tiny_models:bn_net (weights of another architecture?)" in line, line


def test_target_class_out_of_range(out, folders):
    line = _refused(out, "craft", "--model", MODEL, "--n-images", "4", "--heldout", "0", "--method", "sgd",
                    "--target", "10", "--data", f"imagefolder:{folders / 'split'}", "--out", str(out))
    assert "target class 10 is out of range: the model has 10 classes (0…9)" in line, line


# ---------------------------------------------------------------------------- data folders

def _png(path: Path, size: int = 8, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


@pytest.fixture()
def folders(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("UAP_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "data"
    (root / "empty").mkdir(parents=True)
    for cls in ("a", "b"):
        (root / "no-images" / cls).mkdir(parents=True)
        (root / "no-images" / cls / "notes.txt").write_text("not an image")
        for i in range(8):
            _png(root / "one-bad" / cls / f"{i}.png", seed=i)
            (root / "junk" / cls).mkdir(parents=True, exist_ok=True)
            (root / "junk" / cls / f"{i}.jpg").write_bytes(np.random.default_rng(i).bytes(64))
            _png(root / "small" / cls / f"{i}.png", seed=i)
    (root / "one-bad" / "b" / "broken.jpg").write_text("this is not a JPEG")
    for i in range(8):
        _png(root / "single" / "only" / f"{i}.png", seed=i)
        for split in ("train", "test"):  # the model's own size: what a good run reads
            _png(root / "split" / split / "ab"[i % 2] / f"{i}.png", size=32, seed=i)
    return root


@pytest.mark.parametrize("folder,words", [
    ("missing", "imagefolder path {root}/missing does not exist"),
    ("empty", "{root}/empty has no class sub-folders"),
    ("no-images", "{root}/no-images has class folders but no images in them"),
    ("single", "{root}/single has a single class sub-folder ('only')"),
    ("one-bad", "{root}/one-bad/b/broken.jpg is not a readable image"),
    ("junk", "{root}/junk/a/0.jpg is not a readable image"),
    ("small", "the model cannot run on images of shape (3, 8, 8)"),
])
def test_data_folders(folder, words, folders, out):
    line = _refused(out, "craft", "--model", MODEL, "--n-images", "4", "--heldout", "0", "--method", "sgd",
                    "--data", f"imagefolder:{folders / folder}", "--out", str(out))
    assert words.format(root=folders) in line, line


def test_unknown_dataset_and_split(out, tmp_path):
    assert "unknown dataset 'mnist'" in _refused(out, "craft", "--model", MODEL, "--data", "mnist", "--out", str(out))
    path = Perturbation(v=torch.zeros(3, 32, 32), eps=8 / 255).save(tmp_path / "zero")
    line = _refused(out, "evaluate", str(path), "--models", MODEL, "--split", "val", "--out", str(out))
    assert "split must be 'train' or 'test', got 'val'" in line, line


# ---------------------------------------------------------------------------- perturbation files

@pytest.fixture()
def perturbations(tmp_path) -> dict[str, Path]:
    folder = tmp_path / "perts"
    v = (torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) - 0.5) * 2 * 8 / 255
    good = Perturbation(v=v, eps=8 / 255, norm="inf", model="m")
    files = {}
    for name, edit in {"shape": {"shape": [3, 16, 16]}, "eps": {"eps": 1 / 255}, "norm": {"norm": "7"},
                       "l2": {"norm": "2"}}.items():
        path = good.save(folder / name)
        meta = json.loads(path.with_suffix(".json").read_text())
        files[name] = rewrite_metadata(path, json.dumps({**meta, **edit}))
    files["list"] = rewrite_metadata(good.save(folder / "list"), "[1, 2]")
    files["bad-json"] = rewrite_metadata(good.save(folder / "bad-json"), "{not json")
    files.update(damaged_safetensors(folder))
    files["small"] = Perturbation(v=torch.zeros(3, 16, 16), eps=8 / 255).save(folder / "small")
    return files


@pytest.mark.parametrize("name,words", [
    ("shape", "says shape [3, 16, 16] but its tensor is [3, 32, 32]"),
    ("eps", "says eps=0.00392157 (ℓinf) but its tensor has ‖v‖_inf = 0.03"),
    ("norm", "unknown norm '7'"),
    ("l2", "says eps=0.0313725 (ℓ2) but its tensor has ‖v‖_2 = "),
    ("list", "is a JSON list, not an object"),
    ("bad-json", "is not valid JSON"),
    ("random", "could not read"),
    ("truncated", "could not read"),
    ("small", "perturbation 'small' has shape (3, 16, 16) but the images are (3, 32, 32)"),
])
def test_perturbation_files_that_contradict_themselves_or_the_images(name, words, perturbations, out, folders):
    line = _refused(out, "evaluate", str(perturbations[name]), "--models", MODEL, "--n-images", "4",
                    "--data", f"imagefolder:{folders / 'split'}", "--out", str(out))
    assert words in line, line


@pytest.mark.parametrize("text,printed", [
    ("[bold]x[/]", "[bold]x[/]"), ("[/]", "[/]"), ("a\x1b[31mb\nc\u202e", "a\\x1b[31mb\\nc\\u202e"),
    ("ε=8/255 · ℓ∞", "ε=8/255 · ℓ∞"),
])
def test_literal_prints_markup_as_text_and_controls_as_escapes(text, printed):
    import io

    from rich.console import Console

    buffer = io.StringIO()
    Console(file=buffer, width=200).print(cli.literal(text), highlight=False)
    assert buffer.getvalue() == printed + "\n"

