"""``foolbox:<Attack>``: Foolbox minimisation attacks as Algorithm 1's inner step."""
from __future__ import annotations

import math

import pytest
import torch

import uap
from uap import targeted_success_rate
from uap.methods.foolbox_step import foolbox_attack
from tests.method_models import blobs, random_affine, trained_mlp


@pytest.mark.parametrize("norm, attack", [(2, "L2DeepFoolAttack"), (math.inf, "LinfDeepFoolAttack")])
def test_foolbox_deepfool_gives_the_same_v_as_the_builtin_deepfool_on_an_affine_model(norm, attack):
    # On an affine model DeepFool converges in one exact step, so Foolbox's implementation
    # and ours agree up to their step pads (1e-4 vs 1e-5): Algorithm 1 then visits the same
    # images in the same order and accepts the same updates.
    model = random_affine(num_classes=4)
    x = 0.35 + 0.3 * torch.rand(30, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    eps = 1.0 if norm == 2 else 0.08
    kw = dict(eps=eps, norm=norm, max_passes=2, seed=0)
    ours = uap.craft(model, x, method="deepfool", method_options={"norm": norm}, **kw)
    theirs = uap.craft(model, x, method=f"foolbox:{attack}", **kw)
    assert sum(r["updates"] for r in ours.history) >= 3  # v really moved through several updates
    assert [r["updates"] for r in theirs.history] == [r["updates"] for r in ours.history]
    assert torch.allclose(theirs.v, ours.v, atol=2e-3 * eps), (theirs.v - ours.v).abs().max()
    assert theirs.fooling_rate == pytest.approx(ours.fooling_rate)
    assert theirs.method == f"foolbox:{attack}"


def test_targeted_foolbox_carlini_wagner_in_minibatches_moves_inputs_to_the_target():
    # One Foolbox call per minibatch (batch_size=40: the whole set), targeted criterion.
    model = trained_mlp()
    x, _ = blobs(40, seed=1)
    target = 3
    options = {"batch_size": 40,
               "attack_options": {"steps": 100, "binary_search_steps": 5, "stepsize": 0.05}}
    p = uap.craft(model, x, eps=2.0, norm=2, max_passes=2, delta=0.01,
                  method="foolbox:L2CarliniWagnerAttack", method_options=options, target=target)
    first = p.history[0]
    assert first["deepfool_calls"] == 36 and first["updates"] == 36  # the 36 images not predicted as 3
    assert uap.lp_norm(p.v, 2).item() == pytest.approx(2.0, rel=1e-5)
    assert targeted_success_rate(model, x, p.v, target) > 0.4  # base rate: 0.1


def test_foolbox_attack_names_are_checked():
    with pytest.raises(ValueError, match="no attack"):
        foolbox_attack("NoSuchAttack")
    with pytest.raises(ValueError, match="fixed-budget"):
        foolbox_attack("LinfPGD")
    with pytest.raises(ValueError, match="attack_options"):
        foolbox_attack("L2DeepFoolAttack", {"bogus": 1})
    attack = foolbox_attack("L2DeepFoolAttack", {"steps": 7, "candidates": 3, "overshoot": 0.05})
    assert (attack.steps, attack.candidates, attack.overshoot) == (7, 3, 0.05)
    default = foolbox_attack("L2DeepFoolAttack")  # the built-in deepfool method's defaults: like for like
    assert (default.steps, default.candidates, default.overshoot) == (50, 10, 0.02)
    x, _ = blobs(4, seed=0)
    with pytest.raises(ValueError, match="unknown option"):
        uap.craft(trained_mlp(), x, eps=0.1, method="foolbox:L2DeepFoolAttack", method_options={"chunk": 3})
