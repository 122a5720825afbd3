"""Universal adversarial training: δ's step against a plain reference, the free variant, δ in
the checkpoint (exact resume), and δ climbing the loss of a fixed network."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.augment import random_crop_flip
from models.train import TrainConfig, build_method, train
from tests.test_models_train import _images
from uap.projection import project_lp

EPS = 8 / 255


def _method(**options):
    torch.manual_seed(0)
    config = TrainConfig(method="uat", width=4, hparams={"eps": EPS, **options}).resolved()
    return build_method(config).train()


def test_a_step_moves_delta_as_the_plain_reference(tmp_path):
    x, y = _images(16)
    method = _method(step_size=0.5, beta=2.0)
    method.delta.copy_(project_lp(torch.randn(3, 32, 32) * 0.01, EPS, float("inf")))
    before = method.delta.clone()
    reference = {k: v.clone() for k, v in method.state_dict().items()}
    with torch.random.fork_rng():
        torch.manual_seed(5)
        loss = method.training_step(x, y, 0, 10)
    # the reference: the same augmentation draw, then one clamped sign step, projected
    twin = _method(step_size=0.5, beta=2.0)
    twin.load_state_dict(reference)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        xa = random_crop_flip(x, 4)
    d = before.clone().requires_grad_(True)
    ce = F.cross_entropy(twin((xa + d).clamp(0, 1)), y, reduction="none").clamp(max=2.0).sum()
    (g,) = torch.autograd.grad(ce, d)
    expected = (before + 0.5 * EPS * g.sign()).clamp(-EPS, EPS)
    torch.testing.assert_close(method.delta, expected, rtol=0, atol=1e-7)
    assert float(method.delta.abs().max()) <= EPS + 1e-7
    # the network's loss is the label-smoothed cross-entropy at the new δ
    want = F.cross_entropy(twin((xa + expected).clamp(0, 1)), y, label_smoothing=0.1)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_free_variant_steps_delta_from_the_networks_backward():
    x, y = _images(16)
    method = _method(free=True, step_size=1.0)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        loss = method.training_step(x, y, 0, 10)
    assert torch.count_nonzero(method.delta) == 0  # nothing moves before the backward
    leaf = method._leaf
    loss.backward()
    grad = leaf.grad.clone()
    method.after_step(0, 10)
    torch.testing.assert_close(method.delta, (EPS * grad.sign()).clamp(-EPS, EPS), rtol=0, atol=0)


def test_delta_climbs_the_loss_of_a_fixed_network():
    x, y = _images(64)
    method = _method(step_size=0.25)
    with torch.no_grad():
        clean = F.cross_entropy(method(x), y).item()
    for step in range(8):  # δ steps only: the network takes none
        method.training_step(x, y, step, 10)
    with torch.no_grad():
        attacked = F.cross_entropy(method((x + method.delta).clamp(0, 1)), y).item()
    assert attacked > clean
    assert float(method.delta.abs().max()) == pytest.approx(EPS, abs=1e-6)


def test_delta_is_checkpointed_and_resume_is_exact(tmp_path):
    x, y = _images(128)
    cfg = TrainConfig(method="uat", width=4, epochs=2, batch_size=64, knn_every=0, threads=1, hparams={"eps": EPS})
    full, state = train(cfg, tmp_path / "full", data=(x, y))
    assert float(full.delta.abs().max()) > 0 and "delta_linf" in state["history"][-1]
    train(cfg, tmp_path / "split", data=(x, y), max_steps=2)
    resumed, _ = train(cfg, tmp_path / "split", data=(x, y), resume=True)
    torch.testing.assert_close(resumed.delta, full.delta, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", [{"norm": "1"}, {"eps": 0.0}, {"adv_weight": 1.5}, {"step_size": 0}])
def test_bad_options_are_one_error(bad):
    with pytest.raises(ValueError):
        _method(**bad)
