"""Packed multi-crop ViT forward: one pass over all the crops of each image gives every crop the
outputs (and the gradients) of a forward of that crop alone; no crop sees another; DINO's
packed step is its per-resolution step."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import models.backbones as backbones
from models.backbones import resnet18_cifar, vit_small_cifar
from models.methods.dino import DINO
import models.packing as packing
from models.packing import PACKED_ATTENTION, block_diagonal_mask, segment_attention
from models.train import TrainConfig, build_method, check_hparams

N = 3
SIZES = [(32, 32), (32, 32), (16, 16), (24, 16)]  # 2 global, a local, a non-square crop


def _vit(drop_path: float = 0.0) -> backbones.VisionTransformer:
    torch.manual_seed(0)
    vit = vit_small_cifar(dim=32, depth=2, heads=2, drop_path=drop_path).double()
    with torch.no_grad():  # non-trivial [CLS] and positions, so a mix-up between crops would show
        vit.cls_token.normal_()
        vit.pos_embed.normal_()
    return vit


def _crops(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(N, 3, h, w, generator=g, dtype=torch.float64) for h, w in SIZES]


def _alone(vit: backbones.VisionTransformer, crop: torch.Tensor) -> torch.Tensor:
    """All final tokens of a forward of ``crop`` by itself (what ``forward`` computes before taking [CLS])."""
    return vit.norm(vit.blocks(vit._tokens(crop)))


def test_block_diagonal_mask_is_the_explicit_loop():
    lengths = [3, 1, 4, 2]
    segment = [i for i, n in enumerate(lengths) for _ in range(n)]
    loop = torch.tensor([[a == b for b in segment] for a in segment])
    mask = block_diagonal_mask(lengths)
    assert mask.dtype == torch.bool and mask.shape == (10, 10)
    assert torch.equal(mask, loop)
    assert torch.equal(block_diagonal_mask([5]), torch.ones(5, 5, dtype=torch.bool))
    for bad in ([], [2, 0]):
        with pytest.raises(ValueError):
            block_diagonal_mask(bad)


def test_segment_attention_is_attention_with_the_block_diagonal_mask():
    g = torch.Generator().manual_seed(4)
    lengths = [5, 5, 2, 3, 2]  # repeated lengths share one call
    q, k, v = (torch.randn(3, 2, sum(lengths), 4, generator=g, dtype=torch.float64) for _ in range(3))
    masked = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=block_diagonal_mask(lengths))
    torch.testing.assert_close(segment_attention(q, k, v, lengths), masked, rtol=0, atol=1e-12)
    torch.testing.assert_close(segment_attention(q, k, v, [sum(lengths)]),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not cover"):
        segment_attention(q, k, v, [5, 5])


@pytest.mark.parametrize("attention", PACKED_ATTENTION)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_packed_outputs_are_the_per_crop_outputs(mode, attention):
    vit = _vit(drop_path=0.2)
    vit.packed_attention = attention
    if mode == "train":
        vit.train()
        for block in vit.blocks:
            block.drop_path = 0.0
    else:
        vit.eval()
    crops = _crops()
    with torch.no_grad():
        tokens = vit.forward_packed(crops, tokens=True)
        cls = vit.forward_packed(crops)
        for crop, t, c in zip(crops, tokens, cls):
            alone = _alone(vit, crop)
            assert t.shape == alone.shape == (N, 1 + crop.shape[2] * crop.shape[3] // 16, 32)
            torch.testing.assert_close(t, alone, rtol=0, atol=1e-5)
            torch.testing.assert_close(c, vit(crop), rtol=0, atol=1e-5)
            torch.testing.assert_close(c, t[:, 0], rtol=0, atol=0)


def test_stochastic_depth_drops_all_the_crops_of_an_image_together():
    """Per-sequence drop, skipped: with the same draws, each packed crop is the crop's own
    forward, whose blocks draw one keep decision per image as well."""
    vit = _vit(drop_path=0.5).train()
    crops = _crops()
    with torch.no_grad():
        torch.manual_seed(5)
        packed = vit.forward_packed(crops, tokens=True)
        for crop, t in zip(crops, packed):
            torch.manual_seed(5)
            torch.testing.assert_close(t, _alone(vit, crop), rtol=0, atol=1e-5)
        torch.manual_seed(6)
        other = vit.forward_packed(crops, tokens=True)
    assert max(float((a - b).abs().max()) for a, b in zip(packed, other)) > 1e-3  # the drops do matter


def _attend_to_everything(monkeypatch, attention: str) -> None:
    """Undo the separation of crops for ``attention`` (the control of the next test)."""
    if attention == "mask":
        monkeypatch.setattr(backbones, "block_diagonal_mask",
                            lambda lengths, device=None: torch.ones(sum(lengths), sum(lengths), dtype=torch.bool,
                                                                    device=device))
    else:
        monkeypatch.setattr(backbones, "segment_attention",
                            lambda q, k, v, lengths: packing.segment_attention(q, k, v, [sum(lengths)]))


@pytest.mark.parametrize("attention", PACKED_ATTENTION)
def test_a_crop_cannot_attend_to_another(monkeypatch, attention):
    vit = _vit().eval()
    vit.packed_attention = attention
    crops = _crops()
    changed = [c.clone() for c in crops]
    changed[2] = torch.rand_like(changed[2])
    with torch.no_grad():
        before, after = vit.forward_packed(crops, tokens=True), vit.forward_packed(changed, tokens=True)
        for i in (0, 1, 3):
            torch.testing.assert_close(after[i], before[i], rtol=0, atol=1e-6)
        assert float((after[2] - before[2]).abs().max()) > 1e-3
        # the control: without the separation the same change reaches the other crops
        _attend_to_everything(monkeypatch, attention)
        before, after = vit.forward_packed(crops, tokens=True), vit.forward_packed(changed, tokens=True)
    for i in (0, 1, 3):
        assert float((after[i] - before[i]).abs().max()) > 1e-3


@pytest.mark.parametrize("attention", PACKED_ATTENTION)
def test_packed_and_per_crop_give_the_same_parameter_gradients(attention):
    vit = _vit().eval()
    vit.packed_attention = attention
    crops = _crops()
    g = torch.Generator().manual_seed(2)  # a random weighting: the plain sum of LayerNorm outputs hardly moves
    weights = [torch.randn(N, 1 + h * w // 16, 32, generator=g, dtype=torch.float64) for h, w in SIZES]

    def grads(outputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        vit.zero_grad()
        sum((o * w).sum() for o, w in zip(outputs, weights)).backward()
        return {k: p.grad.clone() for k, p in vit.named_parameters()}

    packed = grads(vit.forward_packed(crops, tokens=True))
    alone = grads([_alone(vit, c) for c in crops])
    assert packed.keys() == alone.keys()
    for k in packed:
        assert float(alone[k].abs().max()) > 0, k
        torch.testing.assert_close(packed[k], alone[k], rtol=0, atol=1e-5, msg=k)


def test_forward_packed_refuses_mixed_batches():
    vit = _vit()
    with pytest.raises(ValueError, match="same batch size"):
        vit.forward_packed([torch.rand(2, 3, 32, 32, dtype=torch.float64), torch.rand(3, 3, 16, 16, dtype=torch.float64)])
    with pytest.raises(ValueError, match="at least one crop"):
        vit.forward_packed([])
    with pytest.raises(ValueError, match="attention must be one of"):
        vit.forward_packed([torch.rand(2, 3, 32, 32, dtype=torch.float64)], attention="dense")


def _dino(backbone, packed: bool) -> DINO:
    torch.manual_seed(0)
    return DINO(backbone, out_dim=64, n_local=3, warmup_teacher_steps=0, packed=packed).train()


def test_dino_packed_step_is_the_per_resolution_step():
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    losses, grads, centres = {}, {}, {}
    for packed in (True, False):
        torch.manual_seed(0)
        method = _dino(vit_small_cifar(dim=32, depth=2, heads=2, drop_path=0.0), packed)
        torch.manual_seed(7)  # the same crops for both
        loss = method.training_step(x, None, 0, 10)
        loss.backward()
        losses[packed] = loss.item()
        grads[packed] = torch.cat([p.grad.flatten() for p in method.backbone.parameters()])
        centres[packed] = method.criterion.center.clone()
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(centres[True], centres[False], rtol=0, atol=1e-6)  # the teacher's outputs
    assert float(grads[True].abs().max()) > 0


def test_dino_with_a_resnet_falls_back_to_per_resolution_forwards():
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    method = _dino(resnet18_cifar(width=4), packed=True)
    assert not hasattr(method.backbone, "forward_packed")
    before = [p.detach().clone() for p in method.backbone.parameters()]
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    torch.manual_seed(7)
    loss = method.training_step(x, None, 0, 10)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, method.backbone.parameters()))
    reference = _dino(resnet18_cifar(width=4), packed=False)
    torch.manual_seed(7)
    assert reference.training_step(x, None, 0, 10).item() == loss.item()  # the same path, bit for bit


def test_packed_is_a_recorded_hyperparameter_and_old_dino_cards_still_build():
    assert _dino(vit_small_cifar(dim=32, depth=1, heads=2), packed=False).hparams["packed"] is False
    check_hparams("dino", {"packed": False})  # -H packed=false
    with pytest.raises(ValueError, match="packed for training method 'dino' must be true or false"):
        check_hparams("dino", {"packed": "no"})
    # a card written before the hyper-parameter existed: its config rebuilds the method (packed by default)
    card = json.loads((Path(__file__).resolve().parents[1] / "models" / "zoo" / "dino.json").read_text())
    saved = {k: v for k, v in card["hyperparameters"].items() if k not in ("method_hparams", "lr_effective")}
    assert "packed" not in saved["hparams"] and "packed" not in card["hyperparameters"]["method_hparams"]
    method = build_method(TrainConfig(**saved).resolved())
    assert method.hparams["packed"] is True
    assert not any("packed" in k for k in method.state_dict())  # checkpoints keep their keys


@pytest.mark.parametrize("packed", [False, True])
def test_stochastic_depth_trains_under_bfloat16_autocast(packed):
    """The kept samples' branch comes back in bfloat16 under autocast; it is added to the float32
    residual stream of the skipped samples without a dtype clash, and gradients reach every block."""
    torch.manual_seed(0)
    vit = vit_small_cifar(dim=32, depth=2, heads=2, drop_path=0.3).train()
    crops = [c.float() for c in _crops()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vit.forward_packed(crops) if packed else [vit(c) for c in crops]
        loss = sum(o.float().square().mean() for o in out)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in vit.blocks.parameters())
