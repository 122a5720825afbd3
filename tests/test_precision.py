"""Mixed precision: losses stay float32 inside a bfloat16 autocast region; bad names are refused."""
from __future__ import annotations

import pytest
import torch

from models.clip_loss import clip_loss
from models.losses import byol_loss, dino_loss, info_nce, nt_xent
from models.precision import autocast


def _bf16_exact(*shape, seed=0):
    """Random values that bfloat16 represents exactly, so an fp32 reference sees the same inputs."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16().float()


LOSSES = {
    "nt_xent": lambda a, b, c: nt_xent(a, b, temperature=0.1),
    "info_nce": lambda a, b, c: info_nce(a, b, c, temperature=0.07),
    "byol": lambda a, b, c: byol_loss(a, b),
    "dino": lambda a, b, c: dino_loss([a, b, c[:16]], [a, b], c[:1], 0.1, 0.04),
    "clip": lambda a, b, c: clip_loss(a, b, torch.tensor(100.0)),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_run_in_float32_under_bf16_autocast(name):
    a, b, c = _bf16_exact(16, 32, seed=1), _bf16_exact(16, 32, seed=2), _bf16_exact(64, 32, seed=3)
    reference = LOSSES[name](a, b, c)
    with autocast("bf16"):
        mixed = LOSSES[name](a.bfloat16(), b.bfloat16(), c.bfloat16())
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference, rtol=1e-6, atol=1e-6)


def test_the_decorator_is_what_keeps_the_loss_in_float32():
    a, b = _bf16_exact(16, 32, seed=1), _bf16_exact(16, 32, seed=2)
    reference = nt_xent(a, b, temperature=0.1)
    with autocast("bf16"):
        undecorated = nt_xent.__wrapped__(a, b, temperature=0.1)
    # without it autocast runs the similarity matrix in bfloat16: an error the size of 2e-3 here
    assert abs(undecorated - reference).item() > 1e-4


def test_autocast_validates_the_name():
    with autocast("fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("bf16"):
        assert torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="precision"):
        autocast("fp16")


def test_float64_inputs_keep_their_precision():
    a = torch.randn(8, 16, dtype=torch.float64)
    with autocast("bf16"):
        assert nt_xent(a, a.flip(0)).dtype == torch.float64
