"""Split BatchNorm (MoCo's shuffling BN on one device) against explicit per-chunk BatchNorm."""
import torch
from torch import nn

from models.backbones import build_backbone
from models.methods.moco import MoCo
from models.split_batchnorm import SplitBatchNorm1d, SplitBatchNorm2d, split_batchnorm


def test_training_statistics_are_per_sub_batch():
    torch.manual_seed(0)
    x = torch.randn(12, 3, 4, 4) * 3 + 1
    split, plain = SplitBatchNorm2d(3, num_splits=3), nn.BatchNorm2d(3)
    with torch.no_grad():
        split.weight.uniform_(0.5, 2), split.bias.uniform_(-1, 1)
        plain.load_state_dict(split.state_dict(), strict=False)
    reference = []
    for chunk in x.chunk(3):  # normalise each sub-batch by hand: biased variance, eps inside sqrt
        mean = chunk.mean(dim=(0, 2, 3), keepdim=True)
        var = chunk.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        reference.append((chunk - mean) / torch.sqrt(var + split.eps) * split.weight.view(1, -1, 1, 1)
                         + split.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(split(x), torch.cat(reference), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain(x), torch.cat(reference), atol=1e-3)  # one batch != three sub-batches


def test_eval_mode_and_state_dict_are_plain_batchnorm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8))
    for _ in range(3):
        net(torch.randn(16, 3, 6, 6))  # non-trivial running statistics
    keys, x = set(net.state_dict()), torch.randn(5, 3, 6, 6)
    net.eval()
    expected = net(x)
    split_batchnorm(net, 4)
    assert isinstance(net[1], SplitBatchNorm2d) and isinstance(net[4], SplitBatchNorm1d)
    assert set(net.state_dict()) == keys
    torch.testing.assert_close(net(x), expected)
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8))
    fresh.load_state_dict(net.state_dict())  # exports load into the plain architecture


def test_moco_keys_come_back_in_input_order():
    torch.manual_seed(0)
    moco = MoCo(build_backbone("resnet18", 4), queue_size=64, bn_splits=1)  # one split: shuffling changes nothing
    v = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        direct = moco.key_projector(moco.key_backbone(v))
    mine, everyone = moco._keys(v)  # one process: its keys are the global batch's
    torch.testing.assert_close(mine, direct, rtol=1e-4, atol=1e-5)
    assert torch.equal(everyone, mine)


def test_moco_splits_bn_in_both_encoders():
    moco = MoCo(build_backbone("resnet18", 4), queue_size=64, bn_splits=4)
    for net in (moco.backbone, moco.projector, moco.key_backbone, moco.key_projector):
        bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert bns and all(m.num_splits == 4 for m in bns)


def test_distributed_runs_keep_moco_batchnorm_local(monkeypatch):
    from models.global_batchnorm import GlobalBatchNorm
    from models.methods.simclr import SimCLR
    from models.train import sync_batchnorm_if_distributed

    moco, simclr = MoCo(build_backbone("resnet18", 4), queue_size=64, bn_splits=2), SimCLR(build_backbone("resnet18", 4))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    moco, simclr = sync_batchnorm_if_distributed(moco), sync_batchnorm_if_distributed(simclr)
    assert not any(isinstance(m, GlobalBatchNorm) for m in moco.modules())
    assert any(isinstance(m, GlobalBatchNorm) for m in simclr.modules())
