"""Building blocks with exact expected values: EMA, queue, schedules, augmentations, LARS,
backbones, probes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.augment import MultiCrop, SSLAugment, color_jitter, grayscale, random_crop_flip, random_resized_crop
from models.backbones import Block, resnet18_cifar, vit_small_cifar
from models.heads import DINOHead, ProjectionHead
from models.lars import LARS
from models.momentum import momentum_copy, update_momentum
from models.probes import KNNClassifier, knn_predict, train_linear_probe
from models.queue import MemoryQueue
from models.schedules import cosine_schedule, warmup_cosine_schedule
from models.train import sync_batchnorm_if_distributed


def test_update_momentum_exact_values_and_buffers_copied():
    s, t = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        s.weight.copy_(torch.tensor([1.0, 2.0]))
        t.weight.copy_(torch.tensor([3.0, -1.0]))
        s.running_mean.copy_(torch.tensor([5.0, 6.0]))
    update_momentum(s, t, m=0.75)
    assert torch.equal(t.weight, torch.tensor([0.75 * 3 + 0.25 * 1, 0.75 * -1 + 0.25 * 2]))
    assert torch.equal(t.running_mean, torch.tensor([5.0, 6.0]))
    update_momentum(s, t, m=0.0)  # m = 0 copies the student
    assert torch.equal(t.weight, s.weight)
    with pytest.raises(ValueError):
        update_momentum(s, t, m=1.5)
    frozen = momentum_copy(s)
    assert all(not p.requires_grad for p in frozen.parameters())


def test_queue_enqueue_dequeue_wraps_around():
    q = MemoryQueue(dim=2, size=5)
    q.enqueue(torch.tensor([[1.0, 1], [2, 2], [3, 3]]))
    assert int(q.ptr) == 3
    q.enqueue(torch.tensor([[4.0, 4], [5, 5], [6, 6]]))  # 4, 5 fill the end; 6 overwrites the oldest (1)
    assert int(q.ptr) == 1
    assert torch.equal(q.keys[:, 0], torch.tensor([6.0, 2, 3, 4, 5]))
    q.enqueue(torch.arange(14.0).view(7, 2))  # more keys than slots: only the newest 5 survive
    assert sorted(q.keys[:, 0].tolist()) == [4.0, 6.0, 8.0, 10.0, 12.0]
    with pytest.raises(ValueError):
        q.enqueue(torch.zeros(2, 3))


def test_cosine_schedules_closed_form():
    assert cosine_schedule(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_schedule(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert cosine_schedule(25, 100, 1.0, 0.0) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert cosine_schedule(500, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert warmup_cosine_schedule(5, 110, 10, 2.0) == pytest.approx(1.0)
    assert warmup_cosine_schedule(10, 110, 10, 2.0) == pytest.approx(2.0)
    assert warmup_cosine_schedule(60, 110, 10, 2.0) == pytest.approx(1.0)
    assert warmup_cosine_schedule(110, 110, 10, 2.0) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        cosine_schedule(0, 0, 1.0, 0.0)


def test_random_crop_flip_copies_shifted_pixels_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8, generator=g)
    out = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(1))
    # Reference by explicit loop: each output is some shift (|dx|,|dy| <= 2) of the zero-padded
    # image, possibly mirrored.
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(16):
        candidates = []
        for dy in range(5):
            for dx in range(5):
                crop = padded[i, :, dy:dy + 8, dx:dx + 8]
                candidates += [crop, crop.flip(-1)]
        assert any(torch.equal(out[i], c) for c in candidates), f"image {i} is not a shifted copy"


def test_random_resized_crop_full_scale_is_identity_and_flip_mirrors():
    x = torch.rand(4, 3, 16, 16)
    same = random_resized_crop(x, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    assert torch.allclose(same, x, atol=1e-5)
    mirrored = random_resized_crop(x, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)
    assert torch.allclose(mirrored, x.flip(-1), atol=1e-5)
    small = random_resized_crop(x, 8, scale=(0.1, 0.3))
    assert small.shape == (4, 3, 8, 8)
    with pytest.raises(ValueError):
        random_resized_crop(x[:, :2], 8)


def test_color_jitter_and_grayscale():
    x = torch.rand(32, 3, 8, 8)
    assert torch.equal(color_jitter(x, p=0.0), x)
    y = color_jitter(x, p=1.0)
    assert y.min() >= 0 and y.max() <= 1 and not torch.allclose(y, x)
    gray = grayscale(x)
    ref = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert torch.allclose(gray[:, 1], ref, atol=1e-6)
    # no-op jitter (all strengths 0) leaves images unchanged up to float error
    assert torch.allclose(color_jitter(x, 0, 0, 0, 0, p=1.0), x, atol=1e-5)
    views = SSLAugment(size=8)(x)
    assert views.shape == x.shape and views.min() >= 0 and views.max() <= 1
    crops = MultiCrop(n_local=3)(x)
    assert [c.shape[-1] for c in crops] == [32, 32, 16, 16, 16]


def test_lars_step_matches_formula():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ‖w‖ = 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = LARS([w, b], lr=0.1, momentum=0.9, weight_decay=0.5, trust_coefficient=0.01)
    w.grad, b.grad = torch.tensor([[0.0, 1.0]]), torch.tensor([2.0])
    opt.step()
    g = torch.tensor([[0.0, 1.0]]) + 0.5 * torch.tensor([[3.0, 4.0]])  # grad + wd·w
    trust = 0.01 * 5.0 / g.norm()
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.1 * trust * g)
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.1 * 2.0]))  # 1-D: plain SGD, no decay


def test_resnet_width_and_parameter_count():
    net = resnet18_cifar(width=16)
    assert net.out_dim == 128
    n = sum(p.numel() for p in net.parameters())
    assert 0.6e6 < n < 0.8e6
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 128)
    with pytest.raises(ValueError):
        resnet18_cifar(width=0)


def test_vit_shapes_and_stochastic_depth_skips_dropped_samples():
    vit = vit_small_cifar(dim=32, depth=2, heads=2)
    assert vit(torch.rand(3, 3, 32, 32)).shape == (3, 32)
    assert vit(torch.rand(3, 3, 16, 16)).shape == (3, 32)  # local crops: interpolated positions
    block = Block(dim=8, heads=2, drop_path=0.5).train()
    x = torch.randn(64, 5, 8)
    torch.manual_seed(0)
    out = block._residual(x, block.mlp, block.norm2)
    full = x + block.mlp(block.norm2(x)) / 0.5
    kept = [torch.allclose(out[i], full[i], atol=1e-5) for i in range(64)]
    dropped = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(k != d for k, d in zip(kept, dropped))  # every sample is exactly one of the two
    assert 10 < sum(dropped) < 54
    block.eval()
    assert torch.allclose(block._residual(x, block.mlp, block.norm2), x + block.mlp(block.norm2(x)))


def test_heads_shapes_and_dino_prototypes_unit_norm():
    assert ProjectionHead(16, 32, 8)(torch.randn(4, 16)).shape == (4, 8)
    head = DINOHead(16, out_dim=50, hidden_dim=32, bottleneck_dim=8)
    assert head(torch.randn(4, 16)).shape == (4, 50)
    w = head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(50), atol=1e-5)
    assert not head.last_layer.parametrizations.weight.original0.requires_grad


def test_knn_predict_matches_explicit_vote():
    g = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g)
    query = torch.randn(5, 4, generator=g)
    scores = knn_predict(query, bank, labels, num_classes=3, k=7, temperature=0.1)
    for i in range(5):
        sims = [F.cosine_similarity(query[i], bank[j], dim=0).item() for j in range(30)]
        top = sorted(range(30), key=lambda j: -sims[j])[:7]
        votes = [0.0, 0.0, 0.0]
        for j in top:
            votes[labels[j]] += math.exp(sims[j] / 0.1)
        assert scores[i].tolist() == pytest.approx([v / sum(votes) for v in votes], rel=1e-4)


def test_linear_probe_folds_standardisation_and_fits_separable_data():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 6, generator=g) * 4 + 10  # far from the origin: standardisation matters
    y = torch.randint(0, 3, (300,), generator=g)
    f = centres[y] + 0.3 * torch.randn(300, 6, generator=g)
    probe = train_linear_probe(f, y, 3, epochs=30, batch_size=64)
    assert (probe(f).argmax(1) == y).float().mean() > 0.98


def test_knn_classifier_returns_log_scores():
    enc = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    clf = KNNClassifier(enc, torch.rand(20, 3, 2, 2), torch.arange(20) % 2, num_classes=2, k=5)
    out = clf(torch.rand(3, 3, 2, 2))
    assert out.shape == (3, 2) and torch.allclose(out.exp().sum(1), torch.ones(3), atol=1e-5)
    assert clf.encoder is enc


def test_sync_batchnorm_conversion_is_noop_without_distributed():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert isinstance(sync_batchnorm_if_distributed(net)[1], nn.BatchNorm2d)
    assert isinstance(nn.SyncBatchNorm.convert_sync_batchnorm(net)[1], nn.SyncBatchNorm)
