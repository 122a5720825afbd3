"""Cos-UAP (``method="cos-uap"``): a plain loop update for update, the best direction of an affine
model, resume, options."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import uap
import uap.methods  # noqa: F401  (registers the methods)
from tests.ascent_reference import reference_cos_uap
from tests.method_models import blobs, trained_mlp
from tests.tiny_models import tiny_mlp


def _images(n: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("p, eps, options", [
    (math.inf, 0.06, {"batch_size": 7}),
    (2.0, 1.0, {"batch_size": 7}),
    (math.inf, 0.06, {"batch_size": 16, "step_size": 0.3, "decay": 0.9, "init": 0.5}),
])
def test_cos_uap_matches_a_plain_loop_update_for_update(p, eps, options):
    model, x = tiny_mlp(), _images()
    pert = uap.craft(model, x, eps=eps, norm=p, method="cos-uap", max_passes=3, delta=0, seed=4,
                     method_options=options)
    v_ref = reference_cos_uap(model, x, eps=eps, p=p, passes=3, seed=4, **options)
    assert [r["updates"] for r in pert.history] == [math.ceil(40 / options["batch_size"])] * 3
    torch.testing.assert_close(pert.v, v_ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("norm, eps", [(2, 0.05), (math.inf, 0.03)])
def test_cos_uap_finds_the_most_sensitive_direction_of_an_affine_model(norm, eps):
    # Logits z(x) = z0 + A(x − x0) with z0 = e1 orthogonal to A's range, on images at x0: a
    # perturbation gives z0 + Av ⟂ z0, so cos(z0, z0 + Av) = 1/√(1 + ‖Av‖²) and the best v
    # maximises ‖Av‖ over the ball. ℓ2: ±ε times A's top right singular vector. ℓ∞: a vertex,
    # ±ε(1, 1) here, the only local maximum of ‖Av‖ on the square (AᵀA's off-diagonal, 3.5,
    # exceeds its smaller diagonal entry, 3.25, so at ±ε(1, −1) the gradient points inwards).
    a = torch.tensor([[2.0, 1.5], [0.5, 1.0]])
    x0 = torch.tensor([0.5, 0.5])
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.cat([torch.zeros(1, 2), a]))
        model[1].bias.copy_(torch.cat([torch.ones(1), -a @ x0]))
    x = x0.repeat(20, 1).view(20, 2, 1, 1)
    p = uap.craft(model, x, eps=eps, norm=norm, method="cos-uap", max_passes=6, delta=0,
                  method_options={"batch_size": 4, "step_size": 0.5, "decay": 1.0})
    v = p.v.flatten()
    best = eps * torch.linalg.svd(a).Vh[0] if norm == 2 else eps * torch.ones(2)
    assert torch.allclose(v, best, atol=1e-3 * eps) or torch.allclose(v, -best, atol=1e-3 * eps), (v, best)
    other = eps * torch.linalg.svd(a).Vh[1] if norm == 2 else eps * torch.tensor([1.0, -1.0])
    assert (a @ best).norm() > 1.5 * (a @ other).norm()  # the two candidates really differ


def test_cos_uap_fools_a_trained_model_better_than_random_noise():
    model = trained_mlp()
    x, _ = blobs(200, seed=1)
    xh, _ = blobs(300, seed=2)
    p = uap.craft(model, x, eps=0.2, method="cos-uap", max_passes=3, delta=0, heldout=(xh, None))
    noise = uap.random_perturbation(p.v.shape, 0.2, math.inf, seed=0)
    assert p.heldout_fooling_rate > uap.fooling_rate(model, xh, noise) + 0.15
    assert p.v.abs().max().item() <= 0.2 + 1e-6 and p.method == "cos-uap"


def test_a_resumed_cos_uap_run_is_the_uninterrupted_one():
    model, x = tiny_mlp(), _images()
    run = dict(eps=0.06, method="cos-uap", delta=0, seed=5, method_options={"batch_size": 9})
    full = uap.craft(model, x, max_passes=3, **run)
    first = uap.craft(model, x, max_passes=1, **run)
    resumed = uap.craft(model, x, max_passes=3, resume=first, **run)
    assert torch.equal(resumed.v, full.v)
    assert [r["fooling_rate"] for r in resumed.history] == [r["fooling_rate"] for r in full.history]


def test_cos_uap_is_untargeted_and_checks_its_options():
    model, x = tiny_mlp(), _images(8)
    with pytest.raises(ValueError, match="untargeted"):
        uap.craft(model, x, eps=0.1, method="cos-uap", target=1)
    with pytest.raises(ValueError, match="init"):
        uap.craft(model, x, eps=0.1, method="cos-uap", method_options={"init": 0})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['loss'\]"):
        uap.craft(model, x, eps=0.1, method="cos-uap", method_options={"loss": "cw"})


def test_uap_craft_runs_cos_uap_with_its_options(tmp_path, data_root):
    from typer.testing import CliRunner

    from cli import app

    args = ["craft", "--model", "tests.tiny_models:tiny_linear", "--n-images", "20", "--heldout", "0",
            "--max-passes", "1", "--eps", "0.05", "--method", "cos-uap", "--batch-size", "8", "--data-root",
            str(data_root), "--method-option", "init=0.5"]
    done = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "cos")])
    assert done.exit_code == 0, done.output
    pert = uap.Perturbation.load(tmp_path / "cos" / "perturbation.safetensors")
    assert pert.method == "cos-uap" and pert.history[0]["updates"] == 3
    assert pert.extra["method_options"] == {"batch_size": 8, "init": 0.5}
