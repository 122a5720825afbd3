"""`uap craft`: files written, summary fields, finished-run detection, one-line errors."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from tests.tiny_models import tiny_linear
from uap import Perturbation

MODEL = "tests.tiny_models:tiny_linear"
SMALL = ["--n-images", "12", "--heldout", "10", "--max-passes", "2"]


def _craft(*args: str):
    return CliRunner().invoke(app, ["craft", "--model", MODEL, *SMALL, *args])


def _stderr(result) -> str:
    try:
        return result.stderr
    except ValueError:  # older click mixes the streams
        return result.output


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("craft") / "run"
    result = _craft("--eps", "8/255", "--norm", "inf", "--out", str(out), "--data-root", str(data_root))
    assert result.exit_code == 0, result.output
    return out, result


def test_writes_artefacts_and_summary(finished):
    out, result = finished
    names = {p.name for p in out.iterdir()}
    assert names == {"perturbation.safetensors", "perturbation.json", "perturbation.png", "summary.json",
                     "perturbation.settings.json"}  # the checkpoint and the lock are gone once the run finished
    summary = json.loads((out / "summary.json").read_text())
    for key in ("model", "eps", "norm", "method", "passes", "seconds", "fooling_rate", "heldout_fooling_rate"):
        assert key in summary, key
    assert summary["eps"] == pytest.approx(8 / 255) and summary["norm"] == "inf" and summary["method"] == "deepfool"
    assert 1 <= summary["passes"] <= 2 and summary["heldout_fooling_rate"] is not None
    pert = Perturbation.load(out / "perturbation.safetensors")
    assert pert.v.abs().max() <= 8 / 255 + 1e-6 and pert.model == MODEL
    assert pert.passes == summary["passes"] and pert.fooling_rate == summary["fooling_rate"]
    assert "held-out" in result.output and "fooling rate" in result.output  # the final table
    baseline = summary["baseline"]  # the strongest data-free baseline at the same budget, held out
    assert baseline["name"] in baseline["heldout_fooling_rates"]
    assert baseline["heldout_fooling_rate"] == max(baseline["heldout_fooling_rates"].values())
    assert "strongest baseline" in result.output and baseline["name"] in result.output


def test_same_settings_are_recognised(finished, data_root):
    out, _ = finished
    result = _craft("--eps", "8/255", "--norm", "inf", "--out", str(out), "--data-root", str(data_root))
    assert result.exit_code == 0 and "already holds a finished run" in result.output


def test_different_settings_refuse_to_overwrite(finished, data_root):
    out, _ = finished
    result = _craft("--eps", "4/255", "--out", str(out), "--data-root", str(data_root))
    assert result.exit_code == 2 and "different settings" in _stderr(result)
    assert len([line for line in _stderr(result).splitlines() if line.strip()]) == 1


class _Interrupt(Exception):
    pass


def test_interrupted_run_needs_resume_and_continues(tmp_path, data_root, monkeypatch):
    import uap.universal

    out = tmp_path / "run"
    args = ("--eps", "8/255", "--max-passes", "3", "--delta", "0.001", "--out", str(out), "--data-root", str(data_root))
    real_craft = uap.universal.craft

    def craft_then_crash(*a, callback, **kw):
        def stop_after_pass_1(event):
            answer = callback(event)
            if event["event"] == "pass":
                raise _Interrupt
            return answer

        return real_craft(*a, callback=stop_after_pass_1, **kw)

    monkeypatch.setattr(uap.universal, "craft", craft_then_crash)
    crashed = _craft(*args)
    assert isinstance(crashed.exception, _Interrupt)
    monkeypatch.undo()
    assert (out / "perturbation.partial.safetensors").is_file() and not (out / "summary.json").exists()

    refused = _craft(*args)  # the checkpoint is not silently thrown away
    err = _stderr(refused)
    assert refused.exit_code == 2 and "--resume" in err and "--force" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1

    resumed = _craft(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming after pass 1 from" in resumed.output and "pass 2:" in resumed.output
    assert "pass 1:" not in resumed.output
    summary = json.loads((out / "summary.json").read_text())
    straight = _craft(*args[:-4], "--out", str(tmp_path / "straight"), "--data-root", str(data_root))
    assert straight.exit_code == 0, straight.output
    reference = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["passes"] == reference["passes"] == 3
    assert [r["fooling_rate"] for r in summary["history"]] == [r["fooling_rate"] for r in reference["history"]]
    assert torch.equal(Perturbation.load(out / "perturbation.safetensors").v,
                       Perturbation.load(tmp_path / "straight" / "perturbation.safetensors").v)


def test_bad_out_fails_before_loading_anything(tmp_path, monkeypatch):
    import uap.data
    import uap.targets

    def must_not_run(*args, **kwargs):
        raise AssertionError("loaded a model or data before checking --out")

    monkeypatch.setattr(uap.targets, "resolve_model", must_not_run)
    monkeypatch.setattr(uap.data, "load", must_not_run)
    (tmp_path / "file").write_text("not a folder")
    result = CliRunner().invoke(app, ["craft", "--model", MODEL, *SMALL, "--out", str(tmp_path / "file" / "run")])
    err = _stderr(result)
    assert result.exit_code == 2, result.output
    assert "cannot use" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1


def test_a_run_being_written_is_one_line_exit_2(tmp_path, monkeypatch):
    import os

    import uap.data
    from uap.runs import RunFolder

    def must_not_run(*args, **kwargs):
        raise AssertionError("loaded data although the run is locked")

    monkeypatch.setattr(uap.data, "load", must_not_run)
    out = tmp_path / "run"
    with RunFolder(out).lock():  # as another process writing it would
        result = CliRunner().invoke(app, ["craft", "--model", MODEL, *SMALL, "--out", str(out)])
    err = _stderr(result)
    assert result.exit_code == 2, result.output
    assert "in use" in err and f"pid {os.getpid()}" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1


def test_keep_best_is_recorded_and_consistent(tmp_path, data_root):
    out = tmp_path / "best"
    result = _craft("--eps", "8/255", "--max-passes", "3", "--delta", "0.001", "--keep-best", "--out", str(out),
                    "--data-root", str(data_root))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    rates = [r["fooling_rate"] for r in summary["history"]]
    kept = summary["best_pass"]
    assert summary["settings"]["keep_best"] is True and 1 <= kept <= len(rates)
    assert summary["fooling_rate"] == max(rates) == rates[kept - 1]
    assert Perturbation.load(out / "perturbation.safetensors").fooling_rate == max(rates)
    assert f"v from pass {kept}" in result.output


def test_bf16_precision_is_recorded_and_runs(tmp_path, data_root):
    out = tmp_path / "bf16"
    result = _craft("--eps", "8/255", "--method", "deepfool-batched", "--precision", "bf16", "--out", str(out),
                    "--data-root", str(data_root))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["precision"] == "bf16"
    assert Perturbation.load(out / "perturbation.safetensors").extra["deepfool"]["precision"] == "bf16"


def test_batchnorm_folding_is_recorded_and_can_be_turned_off(tmp_path, data_root):
    folded = []
    for option in ([], ["--no-fold-batchnorm"]):
        out = tmp_path / f"run{len(folded)}"
        result = CliRunner().invoke(app, ["craft", "--model", "tests.tiny_models:bn_net", *SMALL, "--eps", "8/255",
                                          "--method", "deepfool-batched", *option, "--out", str(out),
                                          "--data-root", str(data_root)])
        assert result.exit_code == 0, result.output
        folded.append(Perturbation.load(out / "perturbation.safetensors").extra["batchnorm_folded"])
    assert folded == [5, 0]


def test_user_model_with_weights_and_normalisation(tmp_path, data_root):
    from safetensors.torch import save_file

    model = tiny_linear()
    with torch.no_grad():
        model.bias.add_(1.0)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    out = tmp_path / "run"
    result = _craft("--weights", str(tmp_path / "w.safetensors"), "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25",
                    "--norm", "2", "--eps", "0.5", "--method", "deepfool-batched", "--heldout", "0",
                    "--out", str(out), "--data-root", str(data_root))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["norm"] == "2" and summary["heldout_fooling_rate"] is None
    assert summary["norm_2"] <= 0.5 + 1e-6


def test_method_options_reach_the_method_and_the_record(tmp_path, data_root):
    """Valid ``--method-option``s change the run the way the method defines them."""
    eps = 0.1
    sgd = ["craft", "--model", MODEL, "--n-images", "12", "--heldout", "0", "--max-passes", "1", "--method", "sgd",
           "--eps", str(eps), "--norm", "inf", "--data-root", str(data_root)]
    options = {"default": {}, "step": {"step_size": 0.5}, "batch": {"batch_size": 4}}
    runs = {}
    for name, opts in options.items():
        flags = [a for k, value in opts.items() for a in ("--method-option", f"{k}={value}")]
        result = CliRunner().invoke(app, [*sgd, *flags, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        runs[name] = Perturbation.load(tmp_path / name / "perturbation.safetensors")
        assert runs[name].extra["method_options"] == opts  # what the run used, on record
        assert runs[name].extra["run"]["settings"]["method_options"] == opts
    # 12 images fit one minibatch of 32: one ℓ∞ sign step of step_size·ε (0.1·ε by default)
    for name, step in (("default", 0.1), ("step", 0.5)):
        v = runs[name].v
        assert runs[name].history[0]["updates"] == 1
        torch.testing.assert_close(v.abs(), torch.full_like(v, step * eps))
    assert runs["batch"].history[0]["updates"] == 3  # minibatches of 4: three steps in the pass
    assert not torch.equal(runs["batch"].v, runs["default"].v)


@pytest.mark.parametrize("args,match", [
    (["--eps", "0"], "--eps"), (["--eps", "abc"], "--eps"), (["--norm", "3"], "--norm"),
    (["--delta", "1.5"], "--delta"), (["--method", "nope"], "unknown method"), (["--n-images", "0"], "--n-images"),
    (["--model", "no_such_module:factory"], "cannot import"), (["--mean", "0.5"], "--mean and --std"),
    (["--precision", "fp16"], "--precision"), (["--precision", "bf16", "--method", "sgd"], "--precision"),
    (["--precision", "bf16", "--method", "feature"], "--precision"),
    (["--method-option", "fold_batchnorm=false"], "unknown option"), (["--method-option", "batch_size=8.5"], "batch_size"),
    (["--method", "feature", "--target", "3"], "untargeted"),
    (["--eps", "300/255"], "[0, 1] pixel scale"), (["--eps", "[/]"], "[/]"), (["--model", "[/x]"], "[/x]"),
    (["--model", "[bold]x"], "[bold]x"), (["--device", "meta"], "--device"), (["--device", "[red]"], "[red]"),
    (["--model", "torch.nn:Conv2d"], "without arguments"), (["--model", "os:getcwd"], "nn.Module"),
    (["--mean", "0.5,0.5,0.5", "--std", "0.2,0.2"], "std has 2"),
])
def test_bad_input_exits_2_with_one_line(args, match, tmp_path):
    result = CliRunner().invoke(app, ["craft", "--model", MODEL, *SMALL, "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    err = _stderr(result)
    assert match in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1
