"""Targeted UAPs: targeted DeepFool (``uap.deepfool(..., target=t)``) vs an explicit reference,
success on a trained model."""
from __future__ import annotations

import math

import pytest
import torch

import uap
from uap import deepfool, targeted_success_rate
from uap.criteria import target_margin
from tests.method_models import blobs, random_affine, trained_mlp

PAD = 1e-5  # the step pad of uap.deepfool


def _reference_targeted_deepfool(model, x, target, overshoot=0.02, max_iter=50, norm=2):
    """Targeted DeepFool on an affine model, one image at a time, gradients in closed form.

    ℓ2 steps along ``w``; ℓ∞ steps along ``sign(w)`` with length ``|f| / ‖w‖₁`` (the dual norm)."""
    W, b = model.weight, model.bias
    rs, oks = [], []
    for xi in x:
        x0 = xi.flatten().double()
        total = torch.zeros_like(x0)
        ok = False
        for _ in range(max_iter + 1):
            z = W.double() @ (x0 + (1 + overshoot) * total).clamp(0, 1) + b.double()
            if int(z.argmax()) == target:
                ok = True
                break
            rival = max((k for k in range(len(z)) if k != target), key=lambda k: z[k])
            w = W[target].double() - W[rival].double()  # ∇(z_t − z_rival)
            f = z[rival] - z[target]
            if norm == 2:
                total += (f / w.norm() + PAD) * w / w.norm()
            else:
                total += (f / w.abs().sum() + PAD) * w.sign()
        rs.append(((1 + overshoot) * total).float().view_as(xi))
        oks.append(ok)
    return torch.stack(rs), torch.tensor(oks)


def test_targeted_deepfool_matches_an_explicit_reference_on_an_affine_model():
    model = random_affine(num_classes=5)
    x = 0.35 + 0.3 * torch.rand(12, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    for target in (0, 3):
        r, ok = deepfool(model, x, target=target)
        r_ref, ok_ref = _reference_targeted_deepfool(model, x, target)
        assert torch.equal(ok, ok_ref) and bool(ok.all())
        assert torch.allclose(r, r_ref, atol=1e-5), (r - r_ref).abs().max()
        assert bool((model((x + r).clamp(0, 1)).argmax(1) == target).all())


@pytest.mark.parametrize("overshoot", [0.0, 0.02])
def test_targeted_deepfool_linf_matches_an_explicit_reference(overshoot):
    model = random_affine(num_classes=3)
    x = torch.rand(12, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    clean = model(x).argmax(1)
    for target in (0, 2):  # class 0: one image already there; class 2: some need several steps
        on_target = clean == target
        assert 1 <= int(on_target.sum()) <= 2  # most images must move for the check to mean anything
        r, ok = deepfool(model, x, target=target, norm="inf", overshoot=overshoot)
        r_ref, ok_ref = _reference_targeted_deepfool(model, x, target, overshoot=overshoot, norm="inf")
        assert bool(ok.all()) and bool(ok_ref.all())
        assert bool((model((x + r).clamp(0, 1)).argmax(1) == target).all())
        assert torch.equal(r[on_target], torch.zeros_like(r[on_target]))
        assert torch.allclose(r, r_ref, atol=1e-6), (r - r_ref).abs().max()
    # one ℓ∞ step of a linear model is |f|/‖w‖₁ · sign(w): every entry of r has the same magnitude
    r, _ = deepfool(model, x, target=0, norm="inf", overshoot=overshoot)
    mags = r[clean != 0].flatten(1).abs()
    one_step = (mags.max(1).values - mags.min(1).values) < 1e-6
    assert int(one_step.sum()) >= 8
    assert bool((mags[one_step] > 0).all())


def test_target_margin_is_positive_exactly_on_the_target():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]])
    assert torch.allclose(target_margin(logits, 1), torch.tensor([1.0, -6.0]))
    assert torch.allclose(target_margin(logits, torch.tensor([2, 2])), torch.tensor([-1.0, 5.0]))


@pytest.mark.parametrize("method, options", [("deepfool-targeted", {}), ("sgd", {"batch_size": 10})])
def test_targeted_uap_moves_inputs_to_the_target(method, options):
    # ART's targeted UAP has bug reports of returning all-zero noise; ours must be non-zero
    # and send far more held-out images to the target than its base rate (10 %).
    model = trained_mlp()
    x, _ = blobs(100, seed=1)
    xh, _ = blobs(300, seed=2)
    target = 3
    p = uap.craft(model, x, eps=0.2, method=method, max_passes=3, delta=0.05, target=target, method_options=options)
    base = targeted_success_rate(model, xh, None, target)
    success = targeted_success_rate(model, xh, p.v, target)
    assert p.v.abs().max().item() > 0.1
    assert p.v.abs().max().item() <= 0.2 + 1e-6
    assert base == pytest.approx(0.1, abs=0.02)
    assert success > 0.7, success
    assert p.extra["target"] == target  # recorded in the artefact


def test_targeted_options_are_checked():
    model = trained_mlp()
    x, _ = blobs(20, seed=1)
    with pytest.raises(ValueError, match="needs a target"):
        uap.craft(model, x, eps=0.1, method="deepfool-targeted")
    with pytest.raises(ValueError, match="out of range"):
        uap.craft(model, x, eps=0.1, method="sgd", target=10)
    with pytest.raises(ValueError, match="integer"):
        uap.craft(model, x, eps=0.1, method="sgd", target="cat")
    with pytest.raises(ValueError, match="norm 2 or inf"):
        deepfool(model, x, target=1, norm=1)
    assert math.isclose(targeted_success_rate(model, x, torch.zeros(3, 8, 8), 0),
                        targeted_success_rate(model, x, None, 0))
