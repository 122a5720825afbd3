"""SSL losses against explicit reference computations written out here."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.losses import DINOLoss, byol_loss, dino_loss, info_nce, nt_xent


def _nt_xent_loop(z1, z2, t):
    """SimCLR eq. 1 by a double loop over the 2N views."""
    z = torch.cat([z1, z2])
    n2 = len(z)
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        partner = (i + n) % n2
        denom = sum(math.exp(F.cosine_similarity(z[i], z[k], dim=0).item() / t) for k in range(n2) if k != i)
        num = math.exp(F.cosine_similarity(z[i], z[partner], dim=0).item() / t)
        total += -math.log(num / denom)
    return total / n2


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_nt_xent_matches_double_loop(t):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert nt_xent(z1, z2, t).item() == pytest.approx(_nt_xent_loop(z1, z2, t), rel=1e-5)


def test_nt_xent_prefers_aligned_views_and_validates():
    z = torch.randn(16, 8)
    assert nt_xent(z, z + 0.01 * torch.randn(16, 8)) < nt_xent(z, torch.randn(16, 8))
    with pytest.raises(ValueError):
        nt_xent(z, z[:3])
    with pytest.raises(ValueError):
        nt_xent(z, z, temperature=0)


def test_info_nce_matches_loop():
    g = torch.Generator().manual_seed(1)
    q, k, queue = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), torch.randn(9, 6, generator=g)
    t = 0.2
    ref = 0.0
    for i in range(4):
        pos = math.exp(F.cosine_similarity(q[i], k[i], dim=0).item() / t)
        neg = sum(math.exp(F.cosine_similarity(q[i], queue[j], dim=0).item() / t) for j in range(9))
        ref += -math.log(pos / (pos + neg))
    assert info_nce(q, k, queue, t).item() == pytest.approx(ref / 4, rel=1e-5)
    with pytest.raises(ValueError):
        info_nce(q, k, queue[:, :3])


def test_byol_loss_is_two_minus_two_cos_and_squared_distance():
    g = torch.Generator().manual_seed(2)
    p, z = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    ref = sum(2 - 2 * (p[i] @ z[i]).item() / (p[i].norm() * z[i].norm()).item() for i in range(6)) / 6
    assert byol_loss(p, z).item() == pytest.approx(ref, rel=1e-5)
    dist = ((F.normalize(p, dim=1) - F.normalize(z, dim=1)) ** 2).sum(1).mean()
    assert byol_loss(p, z).item() == pytest.approx(dist.item(), rel=1e-5)
    assert byol_loss(p, 3 * p).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(p, -p).item() == pytest.approx(4.0, abs=1e-5)


def _softmax(v, t):
    e = [math.exp(a / t) for a in v]
    return [a / sum(e) for a in e]


def test_dino_loss_by_hand_cross_view_only():
    g = torch.Generator().manual_seed(3)
    teacher = [torch.randn(2, 4, generator=g) for _ in range(2)]
    student = [torch.randn(2, 4, generator=g) for _ in range(3)]  # 2 global + 1 local
    center = torch.randn(1, 4, generator=g)
    ts, tt = 0.1, 0.04
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]  # (teacher view, student view), never the same view
    ref = 0.0
    for i, j in pairs:
        per_sample = []
        for b in range(2):
            target = _softmax((teacher[i][b] - center[0]).tolist(), tt)
            probs = _softmax(student[j][b].tolist(), ts)
            per_sample.append(-sum(a * math.log(c) for a, c in zip(target, probs)))
        ref += sum(per_sample) / 2
    assert dino_loss(student, teacher, center, ts, tt).item() == pytest.approx(ref / len(pairs), rel=1e-4)


def test_dino_centre_update_and_teacher_temperature_schedule():
    loss = DINOLoss(out_dim=3, student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_steps=10,
                    center_momentum=0.9)
    t1 = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    t2 = torch.tensor([[0.0, 0.0, 6.0], [4.0, 0.0, 2.0]])
    loss([t1, t2], [t1, t2], step=0)
    # centre: 0.9 * 0 + 0.1 * mean of the 4 teacher rows = 0.1 * [2, 1, 3]
    assert torch.allclose(loss.center, torch.tensor([[0.2, 0.1, 0.3]]))
    loss.update_center(torch.tensor([[1.0, 1.0, 1.0]]))
    assert torch.allclose(loss.center, torch.tensor([[0.9 * 0.2 + 0.1, 0.9 * 0.1 + 0.1, 0.9 * 0.3 + 0.1]]))
    assert loss.teacher_temperature(0) == pytest.approx(0.04)
    assert loss.teacher_temperature(5) == pytest.approx(0.055)
    assert loss.teacher_temperature(10) == pytest.approx(0.07)
    assert loss.teacher_temperature(1000) == pytest.approx(0.07)
    with pytest.raises(ValueError):
        DINOLoss(out_dim=3, student_temp=0.05, teacher_temp=0.07)  # teacher must be sharper


def test_dino_centering_removes_a_constant_offset():
    """Centring makes the teacher target invariant to a shared offset (the collapse mode it fights)."""
    g = torch.Generator().manual_seed(4)
    t = [torch.randn(3, 5, generator=g) for _ in range(2)]
    s = [torch.randn(3, 5, generator=g) for _ in range(2)]
    offset = torch.randn(1, 5, generator=g) * 10
    a = dino_loss(s, t, torch.zeros(1, 5))
    b = dino_loss(s, [v + offset for v in t], offset)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
