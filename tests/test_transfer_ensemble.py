"""The transfer matrix's ensemble row: each column's cell is the UAP of every source but that
column, crafted once per distinct ensemble and reused on a re-run."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import uap
from uap.transfer import ENSEMBLE_ROW, transfer_matrix


def _cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(24, 5)).eval()


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(0)
    models = {"a": _cnn(1), "b": _cnn(2), "c": _cnn(3)}
    return models, torch.rand(12, 3, 16, 16, generator=g), torch.rand(10, 3, 16, 16, generator=g)


KW = dict(eps=0.2, method="sgd", max_passes=2, baselines="random", batch_size=5)


def test_each_cell_is_the_ensemble_without_its_column(setup, tmp_path):
    models, xc, xe = setup
    result = transfer_matrix(models, xc, xe, sources=["a", "b"], ensemble=True, out_dir=tmp_path, **KW)
    report = result.report
    assert report.perturbations[:3] == ["a", "b", ENSEMBLE_ROW] and not report.is_baseline(ENSEMBLE_ROW)
    assert report.meta["ensemble"] == {"a": ["b"], "b": ["a"], "c": ["a", "b"]}
    # a and b: the ensemble without the column is the other source alone — its own row's cell
    assert report.cell(ENSEMBLE_ROW, "a")["fooling_rate"] == report.cell("b", "a")["fooling_rate"]
    assert report.cell(ENSEMBLE_ROW, "b")["fooling_rate"] == report.cell("a", "b")["fooling_rate"]
    torch.testing.assert_close(result.ensembles["a"].v, result.crafted["b"].v, rtol=0, atol=0)
    # c is not a source: the ensemble of both, as uap.craft crafts it against the two models
    both = uap.craft([models["a"], models["b"]], xc, eps=0.2, method="sgd", max_passes=2)
    torch.testing.assert_close(result.ensembles["c"].v, both.v, rtol=0, atol=1e-7)
    assert report.cell(ENSEMBLE_ROW, "c")["fooling_rate"] == pytest.approx(uap.fooling_rate(models["c"], xe, both.v))
    largest = max(float(e.v.abs().max()) for e in result.ensembles.values())
    assert math.isclose(report.norm_linf[2], largest, rel_tol=1e-6) and largest <= 0.2 + 1e-6
    names = {p.name for p in (tmp_path / "perturbations").iterdir()}
    assert {"ensemble-without-a.safetensors", "ensemble-without-b.safetensors", "ensemble-all.safetensors"} <= names


def test_a_second_run_reuses_the_ensembles(setup, tmp_path):
    models, xc, xe = setup
    first = transfer_matrix(models, xc, xe, sources=["a", "b"], ensemble=True, out_dir=tmp_path, **KW)
    events = []
    again = transfer_matrix(models, xc, xe, sources=["a", "b"], ensemble=True, out_dir=tmp_path,
                            callback=lambda e, info: events.append((e, info.get("event"))), **KW)
    assert ("craft_step", "pass") not in events
    assert again.report == first.report


def test_methods_that_attack_one_model_refuse_the_ensemble_row(setup):
    models, xc, xe = setup
    with pytest.raises(ValueError, match="one model"):
        transfer_matrix(models, xc, xe, sources=["a", "b"], ensemble=True, **{**KW, "method": "deepfool"})


def test_cli_sources_and_ensemble(tmp_path):
    import json

    from typer.testing import CliRunner

    from cli import app

    args = ["transfer", "--models", "supervised,moco,byol", "--sources", "supervised,moco", "--ensemble", "--method", "sgd",
            "--n-craft", "16", "--n-images", "16", "--max-passes", "1", "--baselines", "random", "--out", str(tmp_path)]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["perturbations"][:3] == ["supervised", "moco", ENSEMBLE_ROW]
    assert saved["meta"]["ensemble"]["byol"] == ["supervised", "moco"]
    bad = CliRunner().invoke(app, [*args[:4], "supervised,clip", *args[5:-1], str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--sources" in bad.output
