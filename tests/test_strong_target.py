"""The airbench target: whitening layer, recipe pieces against closed forms, exact resume, zoo card."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from models.airbench import airbench_net, patch_second_moment, whitening_filters
from models.methods.airbench import Airbench
from models.augment import random_translate
from models.backbones import build_backbone
from models.lookahead import lookahead_decay, lookahead_update
from models.schedules import triangular_schedule
from models.train import CKPT_NAME, TrainConfig, build_method, build_optimizer, train
from models.tta import FlipTranslateTTA
from tests.test_models_train import _images


def _correlated(n: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth, colour-correlated images: their 2×2 patches are far from white."""
    g = torch.Generator().manual_seed(seed)
    base = F.avg_pool2d(torch.rand(n, 1, 34, 34, generator=g), 3, 1)
    return (0.6 * base + 0.4 * torch.rand(n, 3, 1, 1, generator=g) * base).clamp(0, 1)


def test_whitening_filters_whiten_the_patches_they_were_fitted_on():
    x = _correlated().double()
    moment = patch_second_moment(x)
    # an explicit loop over the patches gives the same second moment
    patches = torch.stack([x[:, :, i:i + 2, j:j + 2].reshape(len(x), -1) for i in range(31) for j in range(31)], 1)
    patches = patches.reshape(-1, 12)
    assert torch.allclose(moment, patches.T @ patches / len(patches), atol=1e-12)
    eigenvalues = torch.linalg.eigvalsh(moment).flip(0)
    assert eigenvalues[0] / eigenvalues[-1] > 100  # the input is strongly correlated
    for eps in (0.0, 1e-3):
        w = whitening_filters(x, eps=eps)
        assert w.shape == (24, 3, 2, 2) and torch.equal(w[12:], -w[:12])
        out = F.conv2d(x, w[:12])  # the whitened coordinates of every patch
        cov = patch_second_moment(out, patch=1)
        expected = torch.diag(eigenvalues / (eigenvalues + eps))
        assert torch.allclose(cov, expected, atol=1e-8), (eps, (cov - expected).abs().max())


def test_network_shapes_frozen_parts_and_identity_init():
    torch.manual_seed(0)
    net = build_backbone("airbench", 4)
    assert net.spec == {"backbone": "airbench", "width": 4} and net.out_dim == 16
    assert net(torch.rand(5, 3, 32, 32)).shape == (5, 16)
    assert not net.whiten.weight.requires_grad and net.whiten.bias.requires_grad
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 6 and all(not b.weight.requires_grad and b.bias.requires_grad for b in bns)
    assert all(b.momentum == 0.4 for b in bns)
    conv = net.groups[1].conv1  # 4 → 16 channels: the first 4 filters are identities
    x = torch.randn(2, 4, 8, 8)
    assert torch.allclose(F.conv2d(x, conv.weight[:4], padding=1), x, atol=1e-6)
    assert airbench_net().out_dim == 256 and sum(p.numel() for p in airbench_net().parameters()) == 1_970_232  # 24·12+24 whitening, 6 convs, 6 BN (weight + bias)
    with pytest.raises(ValueError, match="airbench backbone"):
        Airbench(build_backbone("resnet18", 4))


def test_schedules_and_lookahead_against_closed_forms():
    assert [triangular_schedule(s, 10, 2, 2.0) for s in (0, 1, 2, 6, 10)] == pytest.approx([0.4, 1.2, 2.0, 1.0, 0.0])
    assert lookahead_decay(5, 10) == pytest.approx(0.95 ** 5 / 8) and lookahead_decay(0, 10) == 0
    torch.manual_seed(0)
    net, slow = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    net[1].running_mean.fill_(2.0)
    before_net, before_slow = ({k: v.clone() for k, v in m.state_dict().items()} for m in (net, slow))
    lookahead_update(net, slow, 0.3)
    for k, v in before_net.items():
        if v.is_floating_point():
            want = 0.3 * before_slow[k] + 0.7 * v
            assert torch.allclose(slow.state_dict()[k], want) and torch.allclose(net.state_dict()[k], want), k
    assert net[1].num_batches_tracked == before_net["1.num_batches_tracked"]  # integer state is left alone
    with pytest.raises(ValueError):
        lookahead_update(net, slow, 1.5)


def test_random_translate_equals_explicit_reflect_pad_and_crop():
    x = torch.rand(6, 3, 8, 8)
    out = random_translate(x, 2, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    dy, dx = torch.randint(0, 5, (6,), generator=g), torch.randint(0, 5, (6,), generator=g)
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(6):
        assert torch.equal(out[i], padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8])
    assert torch.equal(random_translate(x, 0), x)


def test_tta_is_the_mean_of_the_explicit_views():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    x = torch.rand(3, 3, 8, 8)

    def mirror(v):
        return (model(v) + model(v.flip(-1))) / 2

    p = F.pad(x, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = p[..., 0:8, 0:8], p[..., 2:10, 2:10]
    assert torch.equal(FlipTranslateTTA(model, 0)(x), model(x))
    assert torch.allclose(FlipTranslateTTA(model, 1)(x), mirror(x))
    want = mirror(x) / 2 + mirror(up_left) / 4 + mirror(down_right) / 4
    assert torch.allclose(FlipTranslateTTA(model, 2)(x), want, atol=1e-6)
    with pytest.raises(ValueError):
        FlipTranslateTTA(model, 3)


def _config(**kw) -> TrainConfig:
    base = dict(method="airbench", backbone="airbench", width=4, epochs=2, batch_size=32, knn_every=0, threads=1,
                warmup_epochs=0.5, hparams={"whitening_images": 64, "lookahead_every": 2, "whiten_bias_epochs": 1.0})
    return TrainConfig(**{**base, **kw})


def test_recipe_optimiser_groups_alternating_flip_and_whitening_bias_freeze():
    torch.manual_seed(0)
    config = _config(hparams={"translate": 0, "whitening_images": 64}).resolved()
    method = build_method(config)
    x, y = _images(64)
    fx, _ = method.prepare_data(x, y)
    flipped = (fx == x.flip(-1)).flatten(1).all(1)
    assert ((fx == x).flatten(1).all(1) | flipped).all() and 0 < flipped.sum() < 64  # a coin per image
    opt = build_optimizer(method, config.optimizer, 0.1, config.weight_decay)
    base, biases = opt.param_groups
    assert biases["lr_scale"] == 64 and biases["weight_decay"] == pytest.approx(config.weight_decay / 64)
    assert base["momentum"] == biases["momentum"] == 0.85 and len(biases["params"]) == 6
    assert config.lr == pytest.approx(0.375) and config.weight_decay == pytest.approx(0.0153 / 11.5)
    seen = []
    method.backbone.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    method.training_step(fx[:32], y[:32], 0, 4)   # epoch 0 (2 steps of 32 per epoch): as given
    method.training_step(fx[:32], y[:32], 2, 4)   # epoch 1: every image mirrored
    assert torch.equal(seen[0], fx[:32]) and torch.equal(seen[1], fx[:32].flip(-1))
    assert method.backbone.whiten.bias.requires_grad  # trains for whiten_bias_epochs = 3 epochs of 2 steps …
    method.training_step(fx[:32], y[:32], 6, 8)
    assert not method.backbone.whiten.bias.requires_grad  # … and is frozen from step 6 on


def test_resume_equals_an_uninterrupted_run_and_ends_on_the_slow_weights(tmp_path):
    data = _images(64)
    full, _ = train(_config(), tmp_path / "full", data=data)
    train(_config(), tmp_path / "cut", data=data, max_steps=3)
    resumed, state = train(_config(), tmp_path / "cut", data=data, resume=True)
    # the last step's lr on the triangular schedule: peak (0.375 · 32/256) · (4 − 3) / (4 − 1)
    assert state["step"] == 4 and state["history"][1]["lr"] == pytest.approx(0.375 * 32 / 256 / 3)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    net, slow = full._trained().state_dict(), full.lookahead.state_dict()
    assert all(torch.equal(net[k], slow[k]) for k in net if net[k].is_floating_point())
    saved = load_file(str(tmp_path / "full" / CKPT_NAME))
    assert any(k.startswith("model.lookahead.") for k in saved)  # the slow weights are checkpointed


def test_zoo_entry_card_with_tta_accuracies(tmp_path):
    import models

    from models.zoo_build import build_zoo_entry

    x, y = _images(64)
    method, _ = train(_config(epochs=1), tmp_path / "run", data=(x, y))
    card = build_zoo_entry(tmp_path / "run", "tiny-airbench", zoo_dir=tmp_path / "zoo", data=(x, y, x[:32], y[:32]),
                           probe_epochs=2)
    assert card["method"] == "airbench" and card["backbone"] == "airbench (width 4)"
    assert card["classifier_head"].startswith("supervised") and set(card["tta_accuracy"]) == {"level_1", "level_2"}
    assert card["tta"].startswith("none") and "airbench" in card["training_recipe"]
    loaded = models.load(tmp_path / "zoo" / "tiny-airbench.safetensors")
    with torch.no_grad():
        assert torch.allclose(loaded(x[:8]), method(x[:8]), atol=1e-5)
        level2 = FlipTranslateTTA(loaded, 2)(x[:32]).argmax(1)
    assert card["tta_accuracy"]["level_2"] == pytest.approx((level2 == y[:32]).float().mean().item())
