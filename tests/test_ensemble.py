"""One v against several models: one model in a list is today's run bitwise, two identical
models are the one-model run, two different ones follow the mean of their losses, Algorithm 1
refuses, and `uap craft --model a,b` shows every model's column."""
from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import uap
from cli import app
from tests.test_methods_gd_uap import TwoConv
from tests.tiny_models import tiny_mlp
from uap.criteria import clamped_cross_entropy
from uap.projection import project_lp
from uap.universal import visiting_order


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _strip(history):
    return [{k: r[k] for k in r if k != "seconds"} for r in history]


RUNS = {
    "sgd": dict(method="sgd", eps=0.06, method_options={"batch_size": 7}),
    "sgd-l2": dict(method="sgd", eps=0.8, norm=2, method_options={"batch_size": 5}),
    "sgd-targeted": dict(method="sgd", eps=0.06, target=2, method_options={"batch_size": 7}),
    "gd-uap-data": dict(method="gd-uap", eps=0.06, method_options={"prior": "data", "batch_size": 7}),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_one_model_in_a_list_is_the_one_model_run_bitwise(name):
    model = TwoConv()
    x, held = _images(20, 1), (_images(9, 2), torch.arange(9) % 5)
    kw = dict(RUNS[name], max_passes=2, delta=0.0, heldout=held, model_id="m")
    one, listed = uap.craft(model, x, **kw), uap.craft([model], x, **{**kw, "model_id": ["m"]})
    assert torch.equal(one.v, listed.v) and _strip(one.history) == _strip(listed.history)
    assert one.model == listed.model == "m" and one.extra == listed.extra


@pytest.mark.parametrize("name", list(RUNS))
def test_two_identical_models_are_the_one_model_run(name):
    model, twin = TwoConv(), TwoConv()
    x, held = _images(20, 1), (_images(9, 2), torch.arange(9) % 5)
    kw = dict(RUNS[name], max_passes=2, delta=0.0, heldout=held)
    one = uap.craft(model, x, **kw)
    two = uap.craft({"a": model, "b": twin}, x, **kw)
    assert torch.equal(one.v, two.v)
    for r1, r2 in zip(one.history, two.history):
        for key in ("fooling_rate", "heldout_fooling_rate", "heldout_accuracy", "updates", "visited"):
            assert r1[key] == r2[key], key
        assert r2["heldout_fooling_rates"] == {"a": r1["heldout_fooling_rate"], "b": r1["heldout_fooling_rate"]}
    assert two.model == "a,b" and two.extra["models"] == ["a", "b"]


def test_a_data_free_ensemble_is_the_one_model_run_for_identical_models():
    held = _images(9, 2)
    kw = dict(method="gd-uap", eps=0.06, max_passes=2, heldout=held, method_options={"prior": "range", "steps": 3})
    assert torch.equal(uap.craft(TwoConv(), None, **kw).v, uap.craft([TwoConv(), TwoConv()], None, **kw).v)


def test_two_models_follow_the_mean_of_their_losses():
    """sgd against two different models is the plain loop on the mean of their clamped losses."""
    models, x = [tiny_mlp(0), tiny_mlp(1)], _images(16, 1)
    eps, beta, passes, batch = 0.05, 10.0, 2, 6
    pert = uap.craft(models, x, eps=eps, method="sgd", max_passes=passes, delta=0.0, method_options={"batch_size": batch})
    clean = [m(x).argmax(1) for m in models]
    v = torch.zeros(3, 8, 8)
    for k in range(1, passes + 1):
        for idx in visiting_order(len(x), 0, k).split(batch):
            v.requires_grad_(True)
            z = (x[idx] + v).clamp(0, 1)
            loss = sum(clamped_cross_entropy(m(z), c[idx], beta) for m, c in zip(models, clean)) / 2
            (g,) = torch.autograd.grad(loss, v)
            v = project_lp(v.detach() + 0.1 * eps * 0.7 ** (k - 1) * g.sign(), eps, math.inf)
    torch.testing.assert_close(pert.v, v, rtol=0, atol=1e-7)
    rates = [uap.fooling_rate(m, x, pert.v) for m in models]
    assert pert.history[-1]["fooling_rates"] == {"TinyMLP": rates[0], "TinyMLP#2": rates[1]}
    assert pert.fooling_rate == pytest.approx(sum(rates) / 2)


def test_algorithm_1_refuses_an_ensemble_in_one_line():
    with pytest.raises(ValueError, match="method 'deepfool' crafts against one model") as e:
        uap.craft([tiny_mlp(0), tiny_mlp(1)], _images(4, 1), eps=0.05, method="deepfool")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="model_id must be a list of 2 ids"):
        uap.craft([tiny_mlp(0), tiny_mlp(1)], _images(4, 1), eps=0.05, method="sgd", model_id="m")


def test_the_run_record_fingerprints_every_model(tmp_path):
    from uap.runs import SettingsMismatch, craft_run

    x, kw = _images(8, 1), dict(eps=0.05, method="sgd", max_passes=1)
    craft_run(tmp_path, [tiny_mlp(0), tiny_mlp(1)], x, model_id=["a", "b"], **kw)
    assert craft_run(tmp_path, [tiny_mlp(0), tiny_mlp(1)], x, model_id=["a", "b"], **kw).reused
    with pytest.raises(SettingsMismatch, match="model_sha256"):
        craft_run(tmp_path, [tiny_mlp(0), tiny_mlp(2)], x, model_id=["a", "b"], **kw)


def test_uap_craft_with_a_model_list_reports_every_model(tmp_path, data_root):
    models = "tests.tiny_models:tiny_cnn,tests.tiny_models:bn_net"
    base = ["craft", "--model", models, "--n-images", "12", "--heldout", "10", "--max-passes", "1",
            "--data-root", str(data_root)]
    result = CliRunner().invoke(app, [*base, "--method", "sgd", "--out", str(tmp_path / "a")], terminal_width=200)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    ids = ["tests.tiny_models:tiny_cnn", "tests.tiny_models:bn_net"]
    assert summary["models"] == ids and list(summary["heldout_fooling_rates"]) == ids
    assert summary["model"] == ",".join(ids) and set(summary["baseline"]["models"]) == set(ids)
    assert all(name in result.output for name in ids) and "mean of" in result.output
    bad = CliRunner().invoke(app, [*base, "--method", "deepfool", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "crafts against one model" in bad.output
