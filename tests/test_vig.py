"""The Vision GNN backbone (``vig``): the backbone contract, its blocks' permutation
equivariance, training through the one loop, and the attack engine on it unchanged."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import uap
from models import backbones
from models.backbones import Normalize, build_backbone
from models import vig
from models.vig import Grapher, NodeFFN, VisionGNN
from models.precision import autocast
from models.train import CKPT_NAME, TrainConfig, build_method, build_optimizer
from tests.test_models_train import _eval_loss, _images

TINY = dict(dim=16, depth=1, k=4)


@pytest.fixture
def tiny_vig(monkeypatch):
    """``vig`` by name at test size (dim 16, one Grapher + FFN pair, 4 neighbours)."""
    monkeypatch.setattr(vig, "vig_cifar", functools.partial(vig.vig_cifar, **TINY))


def test_vig_follows_the_backbone_contract():
    net = build_backbone("vig").eval()
    assert net.spec == {"backbone": "vig", "width": 16} and "vig" in backbones.BACKBONES
    assert isinstance(net.normalize, Normalize)  # images in [0, 1]; the normalisation is inside
    assert net.out_dim == 96 and net.pos_embed.shape == (1, 64, 96)  # 4×4 patches of 32×32: 64 nodes
    assert sum(p.numel() for p in net.parameters()) == 977_568
    assert sum(isinstance(m, Grapher) for m in net.blocks) == sum(isinstance(m, NodeFFN) for m in net.blocks) == 6
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        features = net(x)
        assert features.shape == (3, 96) and torch.isfinite(features).all()
        torch.testing.assert_close(net(x[1:2]), features[1:2], atol=1e-5, rtol=1e-5)  # features per image
    with pytest.raises(ValueError, match="takes 32×32 images, got 40×40"):
        net(torch.rand(1, 3, 40, 40))
    with pytest.raises(ValueError, match="power of two"):
        VisionGNN(patch=3)
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
        VisionGNN(patch=16, k=5)


def test_vig_blocks_are_permutation_equivariant_and_only_the_position_embedding_orders_the_patches():
    """The Grapher and FFN blocks (eval mode: BatchNorm is a per-channel affine map) commute with
    any relabelling of the nodes, so the pooled features of permuted nodes are the same; the
    patch order reaches the model through the position embedding alone."""
    torch.manual_seed(0)
    net = VisionGNN(**TINY).eval()
    nn.init.normal_(net.pos_embed, std=0.5)
    for m in net.modules():  # non-trivial BN statistics, so the check sees them
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        h = net.nodes(torch.rand(2, 3, 32, 32))
        perm = torch.randperm(h.shape[1], generator=torch.Generator().manual_seed(1))
        out = net.blocks(h)
        torch.testing.assert_close(net.blocks(h[:, perm]), out[:, perm], atol=1e-5, rtol=1e-5)
        # With a stem that sees one patch per node, rearranging the image's patches permutes the
        # nodes: the features change through the position embedding, and only through it.
        net.stem = nn.Conv2d(3, 16, 4, 4)
        x = torch.rand(2, 3, 32, 32)
        patches = x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(2, 3, 64, 4, 4)    # row-major patches
        x_perm = patches[:, :, perm].reshape(2, 3, 8, 8, 4, 4).permute(0, 1, 2, 4, 3, 5).reshape(2, 3, 32, 32)
        torch.testing.assert_close(net.nodes(x_perm) - net.pos_embed, (net.nodes(x) - net.pos_embed)[:, perm])
        assert not torch.allclose(net(x_perm), net(x), atol=1e-4)
        net.pos_embed.zero_()
        torch.testing.assert_close(net(x_perm), net(x), atol=1e-5, rtol=1e-5)

def test_a_few_steps_lower_the_vig_loss(tiny_vig):
    x, y = _images(128)
    torch.manual_seed(0)
    config = TrainConfig(method="supervised", backbone="vig", optimizer="adamw", lr=1e-3, weight_decay=0.05).resolved()
    method = build_method(config).train()
    assert isinstance(method.backbone, VisionGNN) and method.backbone.out_dim == 16
    opt = build_optimizer(method, config.optimizer, 4e-3, config.weight_decay)
    before = _eval_loss(method, x[:64], y[:64])
    batches = [(x[:64], y[:64]), (x[64:], y[64:])]
    for step in range(6):
        with autocast("fp32"):
            loss = method.training_step(*batches[step % 2], step, 100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _eval_loss(method, x[:64], y[:64])
    assert after < before, f"loss {before:.4f} -> {after:.4f}"


def test_uap_train_supervised_backbone_vig(tiny_vig, data_root, tmp_path, monkeypatch):
    from cli import app

    monkeypatch.setenv("UAP_DATA_DIR", str(data_root))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "supervised", "--backbone", "vig", "--optimizer", "adamw", "--lr", "1e-3",
                                      "--epochs", "1", "--batch-size", "10", "--n-train", "20", "--knn-every", "0",
                                      "--threads", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / CKPT_NAME).is_file()


def test_the_engine_attacks_a_vig_classifier_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(VisionGNN(**TINY), nn.Linear(16, 10)).eval()
    x = torch.rand(16, 3, 32, 32)
    eps = 8 / 255
    result = uap.craft(model, x, eps=eps, method="sgd", max_passes=1)
    v = result.v
    assert v.shape == (3, 32, 32) and result.passes == 1 and 0.0 <= result.fooling_rate <= 1.0
    assert 0.0 < float(v.abs().max()) <= eps + 1e-6  # a real step, inside the L∞ budget


def test_deepfool_gradient_modes_agree_through_the_knn_graph():
    """DeepFool's batched (``is_grads_batched``) and replicated candidate gradients pass through
    the neighbour gather and max as the per-candidate loop does."""
    from uap.deepfool import deepfool

    torch.manual_seed(0)
    model = nn.Sequential(VisionGNN(**TINY), nn.Linear(16, 10)).eval()
    x = torch.rand(2, 3, 32, 32)
    r_loop = deepfool(model, x, gradients="loop")[0]
    assert float(r_loop.norm()) > 0
    for mode in ("replicated", "batched"):
        torch.testing.assert_close(deepfool(model, x, gradients=mode)[0], r_loop, atol=1e-5, rtol=1e-4)
