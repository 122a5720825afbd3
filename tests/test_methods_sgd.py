"""SGD-UAP (``method="sgd"``): closed-form optimum in 2-D, loss, options, artefact."""
from __future__ import annotations

import math

import pytest
import torch

import uap
import uap.methods  # noqa: F401  (registers the methods)
from uap.methods.ascent import ascent_direction
from uap.criteria import ASCENT_LOSSES, Targeted, Untargeted
from uap.methods.sgd import clamped_cross_entropy
from tests.ascent_reference import reference_sgd
from tests.method_models import Linear2D, blobs, trained_mlp, two_class_points
from tests.tiny_models import tiny_mlp

W = (2.0, -1.0)


@pytest.mark.parametrize("norm, eps", [(2, 0.05), (math.inf, 0.03)])
def test_sgd_reaches_the_best_universal_direction_of_a_linear_model(norm, eps):
    # Any v acts on a linear score only through w·v ≥ −ε‖w‖_* (dual norm), so the universal
    # perturbation that fools the most class-1 points (the majority) is the one minimising
    # w·v: v* = −ε w/‖w‖₂ for ℓ2 and v* = −ε sign(w) for ℓ∞. It fools exactly the class-1
    # points with 0 < s < ε‖w‖_*.
    x, w = two_class_points(W)
    model = Linear2D(W, b=-float(w @ torch.tensor([0.5, 0.5])))
    s = model.score(x)
    assert int((s > 0).sum()) == 30
    p = uap.craft(model, x, eps=eps, norm=norm, method="sgd", max_passes=6,
                  method_options={"batch_size": 4})
    v = p.v.flatten()
    if norm == 2:
        best = -eps * w / w.norm()
        dual = w.norm()
    else:
        best = -eps * w.sign()
        dual = w.abs().sum()
    assert torch.allclose(v, best, atol=1e-3 * eps), (v, best)
    expected_rate = float(((s > 0) & (s < eps * dual)).float().mean())
    assert p.fooling_rate == pytest.approx(expected_rate)
    assert 0 < expected_rate < 0.75  # the optimum does not fool everything: a real test


def test_ascent_direction_is_the_dual_norm_maximiser():
    g = torch.tensor([[3.0, -4.0], [0.0, 0.5]])
    assert torch.equal(ascent_direction(g, math.inf), g.sign())
    d2 = ascent_direction(g, 2.0)
    assert d2.norm().item() == pytest.approx(1.0)
    assert (g * d2).sum().item() == pytest.approx(g.norm().item())  # ⟨g, d⟩ = ‖g‖₂ on the unit sphere
    assert torch.equal(ascent_direction(torch.zeros(3), 2.0), torch.zeros(3))


def test_clamped_cross_entropy_matches_an_explicit_loop():
    g = torch.Generator().manual_seed(0)
    logits = 6 * torch.randn(16, 5, generator=g)
    labels = torch.randint(0, 5, (16,), generator=g)
    beta = 3.0
    expected = 0.0
    for z, k in zip(logits.tolist(), labels.tolist()):
        ce = math.log(sum(math.exp(zi) for zi in z)) - z[k]
        expected += min(ce, beta) / 16
    assert clamped_cross_entropy(logits, labels, beta).item() == pytest.approx(expected, rel=1e-5)
    assert clamped_cross_entropy(logits, labels, math.inf).item() > expected  # the clamp was active


def test_sgd_fools_a_trained_model_better_than_random_noise_and_records_the_usual_history():
    model = trained_mlp()
    x, _ = blobs(200, seed=1)
    xh, yh = blobs(300, seed=2)
    p = uap.craft(model, x, eps=0.2, method="sgd", max_passes=3, heldout=(xh, yh))
    noise = uap.random_perturbation(p.v.shape, 0.2, math.inf, seed=0)
    assert p.heldout_fooling_rate > uap.fooling_rate(model, xh, noise) + 0.15
    assert p.v.abs().max().item() <= 0.2 + 1e-6
    record = p.history[-1]
    for key in ("fooling_rate", "heldout_fooling_rate", "heldout_accuracy", "norm_2", "norm_inf",
                "visited", "updates", "seconds"):
        assert key in record
    assert record["visited"] == 200 and record["updates"] == math.ceil(200 / 32)
    assert p.method == "sgd"


def test_sgd_is_reproducible_and_rejects_bad_options():
    model = trained_mlp()
    x, _ = blobs(64, seed=1)
    a = uap.craft(model, x, eps=0.1, method="sgd", max_passes=2, seed=3)
    b = uap.craft(model, x, eps=0.1, method="sgd", max_passes=2, seed=3)
    assert torch.equal(a.v, b.v)
    with pytest.raises(ValueError, match="unknown option"):
        uap.craft(model, x, eps=0.1, method="sgd", method_options={"lr": 0.1})
    with pytest.raises(ValueError, match="decay"):
        uap.craft(model, x, eps=0.1, method="sgd", method_options={"decay": 0.0})
    with pytest.raises(ValueError, match="beta"):
        uap.craft(model, x, eps=0.1, method="sgd", method_options={"beta": -1})
    with pytest.raises(ValueError, match="step_size"):
        uap.craft(model, x, eps=0.1, method="sgd", method_options={"step_size": float("nan")})


LOGITS = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0], [4.0, 0.0, 1.0]])
CLEAN = torch.tensor([1, 2, 1])


def test_each_ascent_loss_matches_its_closed_form():
    untargeted, towards_0 = Untargeted(), Targeted(0)
    ce = [math.log(math.exp(1) + math.exp(3) + math.exp(2)) - 3, math.log(1 + math.exp(-1) + math.exp(5)) - 5,
          math.log(math.exp(4) + 1 + math.exp(1)) - 0]
    assert untargeted.ascent_loss(LOGITS, CLEAN, 2.0).item() == pytest.approx((ce[0] + ce[1] + 2.0) / 3)  # ce[2] > 2
    assert untargeted.ascent_loss(LOGITS, CLEAN, 2.0, "logit").item() == pytest.approx(-(3 + 5 + 0) / 3)
    # max_{j≠y} z_j − z_y: 2 − 3, 0 − 5, 4 − 0 (clamped at β = 2)
    assert untargeted.ascent_loss(LOGITS, CLEAN, 2.0, "cw").item() == pytest.approx((-1 - 5 + 2) / 3)
    assert untargeted.ascent_loss(LOGITS, CLEAN, math.inf, "cw").item() == pytest.approx((-1 - 5 + 4) / 3)
    ce_to_0 = [math.log(math.exp(1) + math.exp(3) + math.exp(2)) - 1, math.log(1 + math.exp(-1) + math.exp(5)),
               math.log(math.exp(4) + 1 + math.exp(1)) - 4]
    assert towards_0.ascent_loss(LOGITS, CLEAN, 2.0).item() == pytest.approx(-sum(ce_to_0) / 3)  # unclamped
    assert towards_0.ascent_loss(LOGITS, CLEAN, 2.0, "logit").item() == pytest.approx((1 + 0 + 4) / 3)
    # z_0 − max_{j≠0} z_j: 1 − 3, 0 − 5, 4 − 1 (clamped at β = 2)
    assert towards_0.ascent_loss(LOGITS, CLEAN, 2.0, "cw").item() == pytest.approx((-2 - 5 + 2) / 3)
    with pytest.raises(ValueError, match="unknown loss 'kl'"):
        untargeted.ascent_loss(LOGITS, CLEAN, 2.0, "kl")
    assert ASCENT_LOSSES == ("ce", "logit", "cw")


@pytest.mark.parametrize("loss", ASCENT_LOSSES)
@pytest.mark.parametrize("p, eps, target", [(math.inf, 0.06, None), (2.0, 1.0, None), (math.inf, 0.06, 2)])
def test_sgd_matches_a_plain_loop_update_for_update(loss, p, eps, target):
    model, x = tiny_mlp(), torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    options = {"batch_size": 7, "loss": loss, "beta": 2.0}
    pert = uap.craft(model, x, eps=eps, norm=p, method="sgd", max_passes=3, delta=0, seed=4, target=target,
                     method_options=options)
    v_ref = reference_sgd(model, x, eps=eps, p=p, passes=3, seed=4, batch_size=7, beta=2.0, loss=loss, target=target)
    assert [r["updates"] for r in pert.history] == [6, 6, 6]
    torch.testing.assert_close(pert.v, v_ref, rtol=0, atol=1e-6)
    assert bool(pert.v.any())


def test_the_loss_changes_the_run_and_the_default_is_the_cross_entropy():
    model, x = tiny_mlp(), torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    run = dict(eps=0.06, method="sgd", max_passes=2, delta=0, seed=4)
    default = uap.craft(model, x, **run).v
    assert torch.equal(uap.craft(model, x, method_options={"loss": "ce"}, **run).v, default)
    assert not torch.equal(uap.craft(model, x, method_options={"loss": "cw"}, **run).v, default)
    with pytest.raises(ValueError, match="option loss for method 'sgd' must be one of 'ce', 'logit', 'cw'"):
        uap.craft(model, x, eps=0.1, method="sgd", method_options={"loss": "kl"})
