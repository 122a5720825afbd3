"""``uap transfer`` and ``uap evaluate`` end to end on a tiny image folder and tiny models."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import cli
from uap.baselines import CHESSBOARDS
from uap.report import Report

runner = CliRunner()
MODELS = "tests.eval_models:linear_target,tests.eval_models:encoder_target"
NAMES = ["linear_target", "encoder_target"]
BASELINE_ROWS = ["random", "gaussian", *CHESSBOARDS,
                 *(f"fourier:{n}" for n in NAMES)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``imagefolder`` data set: 4 classes × (6 train + 4 test) random 8×8 PNGs."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 4)):
        for c in range(4):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture()
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("UAP_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def transfer_run(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer")
    mp = pytest.MonkeyPatch()
    mp.setenv("UAP_CACHE_DIR", str(out / "cache"))
    args = ["transfer", "--models", MODELS, "--eps", "64/255", "--norm", "inf", "--max-passes", "2",
            "--data", f"imagefolder:{folder}", "--n-craft", "12", "--n-images", "8", "--baselines", "all",
            "--out", str(out / "run")]
    result = runner.invoke(cli.app, args)
    mp.undo()
    return result, out / "run", args


def test_transfer_writes_results_and_figures(transfer_run):
    result, out, _ = transfer_run
    assert result.exit_code == 0, result.output
    assert "transfer" in result.output
    for row in BASELINE_ROWS:  # the rich table: each baseline row, marked as one
        assert row in result.output, row
    assert len(re.findall(r"│ baseline +│", result.output)) == len(BASELINE_ROWS)
    data = json.loads((out / "results.json").read_text())
    assert data["perturbations"] == NAMES + BASELINE_ROWS and data["baselines"] == BASELINE_ROWS
    assert data["models"] == NAMES
    assert np.array(data["fooling_rate"]).shape == (2 + len(BASELINE_ROWS), 2)
    assert data["meta"]["command"] == "transfer" and data["n_images"] == 8
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == (2 + len(BASELINE_ROWS)) * 2
    assert {r["perturbation"] for r in rows if r["baseline"] == "1"} == set(BASELINE_ROWS)
    # JSON and CSV hold the same numbers
    assert Report.load_csv(out / "results.csv", classes=data["classes"]) == Report.load_json(out / "results.json")
    for png in ("heatmap.png", "perturbations.png", "examples.png"):
        blob = (out / png).read_bytes()
        assert blob[:4] == b"\x89PNG" and len(blob) > 2000
    for name in NAMES:
        assert (out / "perturbations" / f"{name}.settings.json").is_file()


def test_transfer_rerun_reuses_crafted_perturbations(transfer_run, env):
    first, out, args = transfer_run
    assert first.exit_code == 0, first.output
    before = json.loads((out / "results.json").read_text())
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert result.output.count("reusing the perturbation") == 2
    after = json.loads((out / "results.json").read_text())
    assert after["fooling_rate"] == before["fooling_rate"]


def test_evaluate_chosen_baselines(transfer_run, folder, tmp_path, env):
    _, run, _ = transfer_run
    perts = [str(run / "perturbations" / n) for n in NAMES]
    base = ["evaluate", *perts, "--models", MODELS, "--data", f"imagefolder:{folder}", "--n-images", "8"]
    result = runner.invoke(cli.app, [*base, "--baselines", "random,chessboard4", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "a" / "results.json").read_text())
    assert data["perturbations"] == NAMES + ["random", "chessboard4"]
    assert data["baselines"] == ["random", "chessboard4"] and data["meta"]["n_craft"] == 0  # no search, no train images
    result = runner.invoke(cli.app, [*base, "--baselines", "none", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b" / "results.json").read_text())["perturbations"] == NAMES


def test_evaluate_saved_perturbations(transfer_run, folder, tmp_path, env):
    _, run, _ = transfer_run
    perts = [str(run / "perturbations" / n) for n in NAMES]
    out = tmp_path / "eval"
    result = runner.invoke(cli.app, ["evaluate", *perts, "--models", MODELS, "--data", f"imagefolder:{folder}",
                                     "--n-images", "8", "--n-craft", "12", "--baselines", "all", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "chessboard2" in result.output and "fourier:encoder_target" in result.output
    assert len(re.findall(r"│ baseline +│", result.output)) == len(BASELINE_ROWS)
    data = json.loads((out / "results.json").read_text())
    assert data["perturbations"] == NAMES + BASELINE_ROWS and data["models"] == NAMES
    assert data["baselines"] == BASELINE_ROWS and data["meta"]["n_craft"] == 12
    # same perturbations, same held-out images, baselines at the same norm and searched on the same
    # train images: the same matrix as the transfer run
    transfer = json.loads((run / "results.json").read_text())
    assert data["fooling_rate"] == transfer["fooling_rate"]
    assert data["meta"]["baselines"]["fourier:linear_target"]["frequency"] == \
        transfer["meta"]["baselines"]["fourier:linear_target"]["frequency"]
    for png in ("heatmap.png", "perturbations.png", "examples.png"):
        assert (out / png).stat().st_size > 2000


def test_evaluate_baselines_alone_at_an_explicit_budget(folder, tmp_path, env):
    base = ["evaluate", "--models", MODELS, "--data", f"imagefolder:{folder}", "--n-images", "8",
            "--baselines", "random,chessboard2"]
    result = runner.invoke(cli.app, [*base, "--eps", "16/255", "--norm", "2", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "a" / "results.json").read_text())
    assert data["perturbations"] == ["random", "chessboard2"] == data["baselines"]
    assert data["meta"]["baseline_norm"] == pytest.approx(16 / 255) and data["meta"]["baseline_p"] == "2"
    assert data["norm_l2"] == pytest.approx([16 / 255] * 2)
    refused = runner.invoke(cli.app, [*base, "--out", str(tmp_path / "b")])  # no perturbation, no budget
    assert refused.exit_code == 2 and "--eps" in refused.output and not (tmp_path / "b").exists()


def test_evaluate_never_drops_a_requested_baseline(folder, tmp_path, env):
    from uap.perturbation import Perturbation

    import torch

    Perturbation(v=torch.zeros(3, 8, 8), eps=8 / 255).save(tmp_path / "zero")
    base = ["evaluate", str(tmp_path / "zero"), "--models", MODELS, "--data", f"imagefolder:{folder}",
            "--n-images", "8", "--baselines", "random"]
    refused = runner.invoke(cli.app, [*base, "--out", str(tmp_path / "a")])
    assert refused.exit_code == 2 and "norm 0" in refused.output and "--eps" in refused.output
    result = runner.invoke(cli.app, [*base, "--eps", "8/255", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b" / "results.json").read_text())["perturbations"] == ["zero", "random"]


def test_evaluate_takes_the_folder_craft_wrote(folder, tmp_path, env):
    run = tmp_path / "first"
    crafted = runner.invoke(cli.app, ["craft", "--model", "tests.eval_models:linear_target", "--data",
                                      f"imagefolder:{folder}", "--n-images", "8", "--heldout", "0", "--method", "sgd",
                                      "--max-passes", "1", "--eps", "16/255", "--out", str(run)])
    assert crafted.exit_code == 0, crafted.output
    result = runner.invoke(cli.app, ["evaluate", str(run), "--models", MODELS, "--data", f"imagefolder:{folder}",
                                     "--n-images", "8", "--baselines", "random", "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "e" / "results.json").read_text())
    assert data["perturbations"] == ["first", "random"]
    assert data["norm_linf"][0] > 0 and data["meta"]["baseline_norm"] == pytest.approx(data["norm_linf"][0])


@pytest.mark.parametrize(
    "args, message",
    [
        (["transfer", "--models", "", "--out", "x"], "--models: the model list is empty"),
        (["transfer", "--models", MODELS, "--eps", "0", "--out", "x"], "--eps"),
        (["transfer", "--models", MODELS, "--norm", "3", "--out", "x"], "--norm"),
        (["transfer", "--models", "nosuchpkg.mod:f", "--out", "x"], "cannot import"),
        (["transfer", "--models", "no-such-zoo-model", "--out", "x"], "--models: unknown model 'no-such-zoo-model'"),
        (["evaluate", "does/not/exist", "--models", MODELS, "--out", "x"], "does/not/exist"),
        (["transfer", "--models", MODELS, "--baselines", "random,stripes", "--out", "x"],
         "--baselines: unknown baseline 'stripes'"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, env):
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_models_all_means_every_zoo_model(monkeypatch):
    import uap.targets

    def zoo_of(names):  # the zoo is the source that answers bare names
        source = uap.targets.ModelSource(load=lambda name: None, names=lambda: list(names), bare=True)
        monkeypatch.setattr(uap.targets, "model_sources", lambda: {"zoo": source})

    zoo_of(MODELS.split(","))
    loaded, specs = cli.options.load_models("all")
    assert specs == MODELS.split(",") and list(loaded) == NAMES
    zoo_of([])
    with pytest.raises(cli.UsageError, match="^--models: all: the model zoo has no models"):
        cli.options.load_models("all")
    with pytest.raises(cli.UsageError, match="^--models: the model list names a model twice"):
        cli.options.load_models("a,b,a")


def test_library_errors_are_told_in_option_names():
    with pytest.raises(cli.UsageError, match="^--mean and --std: give both mean and std"):
        cli.options.resolve_target("tests.eval_models:linear_target", "--model", mean=[0.5])
    with pytest.raises(cli.UsageError, match="^--weights: "):
        cli.options.resolve_target("no-such-zoo-model", "--model", weights=Path("w.safetensors"))
    with pytest.raises(cli.UsageError, match="^--model: cannot import"):
        cli.options.resolve_target("nosuchpkg.mod:f", "--model")
