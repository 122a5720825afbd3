"""SGA (``method="sga"``): a plain loop update for update, the best direction of a linear model,
resume, options."""
from __future__ import annotations

import math

import pytest
import torch

import uap
import uap.methods  # noqa: F401  (registers the methods)
from tests.ascent_reference import reference_sga
from tests.method_models import Linear2D, blobs, trained_mlp, two_class_points
from tests.tiny_models import tiny_mlp

SMALL = {"batch_size": 12, "inner_batch_size": 5, "inner_steps": 2}  # 40 images: minibatches 12+12+12+4, inner 5+5+2


def _images(n: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("p, eps, options, target", [
    (math.inf, 0.06, {}, None),
    (2.0, 1.0, {}, None),
    (math.inf, 0.06, {"momentum": 0.9, "decay": 0.8, "inner_step_size": 0.3}, None),
    (2.0, 1.0, {"momentum": 0.5, "loss": "cw", "beta": 2.0}, None),
    (math.inf, 0.06, {"loss": "logit"}, None),
    (math.inf, 0.06, {"loss": "cw", "beta": 2.0}, 2),
])
def test_sga_matches_a_plain_loop_update_for_update(p, eps, options, target):
    model, x = tiny_mlp(), _images()
    opts = {**SMALL, **options}
    pert = uap.craft(model, x, eps=eps, norm=p, method="sga", max_passes=2, delta=0, seed=4, target=target,
                     method_options=opts)
    v_ref, updates = reference_sga(model, x, eps=eps, p=p, passes=2, seed=4, target=target, **opts)
    assert [r["updates"] for r in pert.history] == updates == [4, 4]
    assert [r["visited"] for r in pert.history] == [40, 40]
    torch.testing.assert_close(pert.v, v_ref, rtol=0, atol=1e-6)
    assert bool(pert.v.any())


@pytest.mark.parametrize("loss", ["ce", "logit", "cw"])
@pytest.mark.parametrize("norm, eps", [(2, 0.05), (math.inf, 0.03)])
def test_sga_reaches_the_best_universal_direction_of_a_linear_model(norm, eps, loss):
    # As for sgd (test_methods_sgd): the universal perturbation that fools the most class-1
    # points (the majority) minimises w·v, so v* = −ε w/‖w‖₂ (ℓ2) or −ε sign(w) (ℓ∞), and it
    # fools exactly the class-1 points with 0 < s < ε‖w‖_*.
    x, w = two_class_points((2.0, -1.0))
    model = Linear2D((2.0, -1.0), b=-float(w @ torch.tensor([0.5, 0.5])))
    s = model.score(x)
    p = uap.craft(model, x, eps=eps, norm=norm, method="sga", max_passes=4, delta=0,
                  method_options={"batch_size": 10, "inner_batch_size": 3, "inner_steps": 2, "step_size": 0.25,
                                  "loss": loss, "beta": 50.0})
    best, dual = (-eps * w / w.norm(), w.norm()) if norm == 2 else (-eps * w.sign(), w.abs().sum())
    assert torch.allclose(p.v.flatten(), best, atol=1e-3 * eps), (p.v.flatten(), best)
    expected_rate = float(((s > 0) & (s < eps * dual)).float().mean())
    assert p.fooling_rate == pytest.approx(expected_rate)
    assert 0 < expected_rate < 0.75


def test_sga_fools_a_trained_model_better_than_random_noise():
    model = trained_mlp()
    x, _ = blobs(200, seed=1)
    xh, _ = blobs(300, seed=2)
    p = uap.craft(model, x, eps=0.2, method="sga", max_passes=2, delta=0, heldout=(xh, None),
                  method_options={"batch_size": 50, "inner_steps": 1})
    noise = uap.random_perturbation(p.v.shape, 0.2, math.inf, seed=0)
    assert p.heldout_fooling_rate > uap.fooling_rate(model, xh, noise) + 0.15
    assert p.v.abs().max().item() <= 0.2 + 1e-6 and p.method == "sga"
    assert 0 < p.history[-1]["visited"] == 200 and p.history[-1]["updates"] == 4


def test_a_resumed_sga_run_is_the_uninterrupted_one():
    model, x = tiny_mlp(), _images()
    run = dict(eps=0.06, method="sga", delta=0, seed=5, method_options={**SMALL, "momentum": 0.9, "decay": 0.7})
    full = uap.craft(model, x, max_passes=3, **run)
    first = uap.craft(model, x, max_passes=1, **run)
    resumed = uap.craft(model, x, max_passes=3, resume=first, **run)
    assert torch.equal(resumed.v, full.v)
    assert [r["fooling_rate"] for r in resumed.history] == [r["fooling_rate"] for r in full.history]


def test_sga_options_are_typed_and_checked():
    model, x = tiny_mlp(), _images(8)
    defaults = uap.methods.make_method("sga").options
    assert (defaults.batch_size, defaults.inner_batch_size, defaults.inner_steps, defaults.step_size,
            defaults.inner_step_size, defaults.decay, defaults.momentum, defaults.beta, defaults.loss) == (
        250, 10, 4, 0.1, 0.1, 1.0, 0.0, 9.0, "ce")  # the paper's settings
    for bad, match in [({"inner_batch_size": 0}, "inner_batch_size"), ({"inner_steps": 0}, "inner_steps"),
                       ({"inner_step_size": math.inf}, "inner_step_size"), ({"momentum": 1.5}, "momentum"),
                       ({"loss": "kl"}, "loss.*one of"), ({"inner_steps": 2.0}, "inner_steps.*an integer")]:
        with pytest.raises(ValueError, match=match):
            uap.craft(model, x, eps=0.1, method="sga", method_options=bad)


def test_uap_craft_runs_sga_with_its_options(tmp_path, data_root):
    from typer.testing import CliRunner

    from cli import app

    args = ["craft", "--model", "tests.tiny_models:tiny_linear", "--n-images", "20", "--heldout", "0",
            "--max-passes", "1", "--eps", "0.05", "--method", "sga", "--batch-size", "10", "--data-root", str(data_root),
            "--method-option", "loss=cw", "--method-option", "inner_steps=1", "--method-option", "momentum=0.9"]
    done = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "sga")])
    assert done.exit_code == 0, done.output
    pert = uap.Perturbation.load(tmp_path / "sga" / "perturbation.safetensors")
    assert pert.method == "sga" and pert.history[0]["updates"] == 2
    assert pert.extra["method_options"] == {"batch_size": 10, "loss": "cw", "inner_steps": 1, "momentum": 0.9}
    refused = CliRunner().invoke(app, [*args, "--method-option", "loss=kl", "--out", str(tmp_path / "bad")])
    assert refused.exit_code == 2 and "loss" in refused.output and not (tmp_path / "bad").exists()
