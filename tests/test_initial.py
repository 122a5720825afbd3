"""init=: a run starts exactly from the projected baseline or file, records it, resumes and
reuses accordingly, and a bad start is one error line (exit 2 from `uap craft`)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import uap
from cli import app
from tests.tiny_models import tiny_mlp
from uap.baselines import chessboard, random_perturbation
from uap.methods import register_method
from uap.projection import project_lp
from uap.runs import SettingsMismatch, craft_run

STARTS: list[torch.Tensor] = []


@register_method("test-record-start")
def _record_start(ctx) -> None:
    """A pass that keeps the v it starts from and changes nothing."""
    STARTS.append(ctx.v.detach().cpu().clone())


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _start(**kw) -> torch.Tensor:
    STARTS.clear()
    uap.craft(tiny_mlp(), _images(6, 1), method="test-record-start", max_passes=1, **kw)
    return STARTS[0]


@pytest.mark.parametrize("norm,eps", [(math.inf, 0.05), (2, 0.7)])
def test_a_baseline_start_is_the_baseline_at_the_budget(norm, eps):
    start = _start(eps=eps, norm=norm, init="chessboard2n")  # at ‖·‖p = ε up to float32 rounding: projected
    assert torch.equal(start, project_lp(chessboard((3, 8, 8), eps, norm, cell=2, sign=-1), eps, norm))
    assert torch.equal(_start(eps=eps, norm=norm, init="random", seed=3),
                       project_lp(random_perturbation((3, 8, 8), eps, norm, seed=3), eps, norm))


def test_a_file_or_run_folder_start_is_the_projected_file(tmp_path):
    v = (torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(5)) - 0.5) * 0.2  # ‖v‖∞ up to 0.1
    path = uap.Perturbation(v=v, eps=0.1, norm="inf").save(tmp_path / "earlier.safetensors")
    assert torch.equal(_start(eps=0.05, init=str(path)), project_lp(v, 0.05, math.inf))
    assert torch.equal(_start(eps=0.05, init=path), v.clamp(-0.05, 0.05))
    assert torch.equal(_start(eps=1.0, norm=2, init=path), project_lp(v, 1.0, 2))
    run = tmp_path / "run"
    run.mkdir()
    uap.Perturbation(v=v, eps=0.1, norm="inf").save(run / "perturbation.safetensors")
    assert torch.equal(_start(eps=0.05, init=run), v.clamp(-0.05, 0.05))
    pert = uap.craft(tiny_mlp(), _images(6, 1), eps=0.05, method="sgd", max_passes=1, init=path)
    assert pert.extra["init"] == {"file": str(path), "sha256": uap.runs.tensor_fingerprint(v)}


def test_the_rate_before_the_first_pass_is_measured_at_the_start():
    model, x = tiny_mlp(), _images(30, 1)
    pert = uap.craft(model, x, eps=0.2, method="test-record-start", max_passes=1, init="chessboard1", keep_best=True)
    assert pert.extra["best_pass"] == 0 and torch.equal(pert.v, chessboard((3, 8, 8), 0.2, cell=1))
    assert pert.history[0]["fooling_rate"] == uap.fooling_rate(model, x, pert.v)


def test_a_resumed_run_from_a_start_is_the_uninterrupted_one():
    model, x = tiny_mlp(), _images(20, 1)
    kw = dict(eps=0.05, method="sgd", delta=0.0, init="chessboard2n", method_options={"batch_size": 7})
    whole = uap.craft(model, x, max_passes=3, **kw)
    rest = uap.craft(model, x, max_passes=3, resume=uap.craft(model, x, max_passes=1, **kw), **kw)
    assert torch.equal(rest.v, whole.v) and rest.extra["init"] == whole.extra["init"] == "chessboard2n"
    assert not torch.equal(whole.v, uap.craft(model, x, max_passes=3, **{**kw, "init": None}).v)


def test_the_run_record_holds_the_start_so_reuse_and_resume_account_for_it(tmp_path):
    model, x, out = tiny_mlp(), _images(10, 1), tmp_path / "run"
    kw = dict(eps=0.05, method="sgd", max_passes=1)
    craft_run(out, model, x, init="chessboard2n", **kw)
    assert craft_run(out, model, x, init="chessboard2n", **kw).reused
    with pytest.raises(SettingsMismatch, match=r"craft\.init"):
        craft_run(out, model, x, init="chessboard2", **kw)
    v = torch.full((3, 8, 8), 0.01)
    path = uap.Perturbation(v=v, eps=0.05).save(tmp_path / "start.safetensors")
    craft_run(tmp_path / "from-file", model, x, init=path, **kw)
    uap.Perturbation(v=-v, eps=0.05).save(path)  # the same path, another tensor: another run
    with pytest.raises(SettingsMismatch, match=r"craft\.init"):
        craft_run(tmp_path / "from-file", model, x, init=path, **kw)
    record = json.loads((out / "perturbation.settings.json").read_text())
    assert record["craft"]["init"] == "chessboard2n"


def test_a_bad_start_is_one_clear_error(tmp_path):
    model, x = tiny_mlp(), _images(6, 1)
    with pytest.raises(ValueError, match="init 'chessboard' names 8 baselines"):
        uap.craft(model, x, eps=0.05, method="sgd", init="chessboard")
    with pytest.raises(FileNotFoundError, match="neither a baseline nor a perturbation file"):
        uap.craft(model, x, eps=0.05, method="sgd", init=str(tmp_path / "missing.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="could not read"):
        uap.craft(model, x, eps=0.05, method="sgd", init=tmp_path / "junk.safetensors")
    uap.Perturbation(v=torch.zeros(3, 4, 4), eps=0.05).save(tmp_path / "small.safetensors")
    with pytest.raises(ValueError, match=r"init perturbation is \(3, 4, 4\), the run's images are \(3, 8, 8\)"):
        uap.craft(model, x, eps=0.05, method="sgd", init=tmp_path / "small.safetensors")
    with pytest.raises(ValueError, match="the fourier baseline needs crafting images"):
        uap.craft(model, None, eps=0.05, method="gd-uap", init="fourier", heldout=x)


def test_uap_craft_init_records_the_start_and_refuses_a_bad_file_in_one_line(tmp_path, data_root):
    base = ["craft", "--model", "tests.tiny_models:tiny_linear", "--method", "sgd", "--n-images", "12", "--heldout", "10",
            "--max-passes", "1", "--data-root", str(data_root)]
    result = CliRunner().invoke(app, [*base, "--init", "chessboard2n", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["init"] == "chessboard2n" and summary["settings"]["init"] == "chessboard2n"
    assert uap.Perturbation.load(tmp_path / "a" / "perturbation.safetensors").extra["init"] == "chessboard2n"
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    bad = CliRunner().invoke(app, [*base, "--init", str(tmp_path / "junk.safetensors"), "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and not (tmp_path / "b").exists()
    lines = [line for line in bad.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --init: could not read")
