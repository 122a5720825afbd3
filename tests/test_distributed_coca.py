"""CoCa data-parallel: two gloo ranks with half a batch each take the step one process takes
with the whole batch — the contrastive part contrasts the global batch (gathered negatives)
and the per-caption captioning loss adds up across ranks even when the ranks' captions have
different lengths. The control computes the contrastive loss per rank and must differ.

Captions are fixed per class (two templates of different lengths) and images unaugmented, so
nothing random separates the runs."""
from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from tests.test_distributed import spawn_two_ranks

B, SIZE, TOL = 64, 16, 1e-5
TINY = dict(embed_dim=16, text_width=16, text_heads=2, unimodal_layers=1, multimodal_layers=1, caption_queries=2,
            val_size=0, word_dropout=0.0)


def _method():
    from models.backbones import build_backbone
    from models.methods.coca import CoCaMethod

    class FixedCaptionCoCa(CoCaMethod):
        """CoCa on one fixed caption per class (long for even classes, short for odd), no augmentation."""

        def training_step(self, x, y, step, max_steps):
            captions = [f"a photo of a {self.classes[int(c)]}." if c % 2 == 0 else f"a {self.classes[int(c)]}."
                        for c in y]
            ids, eot = self.captioner.tokenize(captions)
            return self.captioner.loss(x, ids, eot, self.contrastive_weight, self.caption_weight)

    torch.manual_seed(0)
    return FixedCaptionCoCa(build_backbone("resnet18", 4), TINY)


def _steps(steps: int = 2) -> dict:
    from models.parallel import parallelize, rank_rows, rank_share
    from models.train import build_optimizer, optimisation_step, sync_batchnorm_if_distributed

    method = sync_batchnorm_if_distributed(_method())
    stepper = parallelize(method, "ddp")
    optimizer = build_optimizer(method, "sgd", 0.05, 1e-4)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(B, 3, SIZE, SIZE, generator=g), torch.randint(0, 10, (B,), generator=g)
    rows = rank_rows(B)
    method.train()
    losses = []
    for step in range(steps):
        xs = x if step % 2 == 0 else x.flip(2)
        losses.append(float(optimisation_step(method, optimizer, xs[rows], y[rows], step, 10, forward=stepper,
                                              share=rank_share(B))))
    return {"losses": losses, "params": torch.cat([p.detach().flatten() for p in method.parameters()])}


def _worker(rank: int, size: int, port: int, path: str) -> None:
    import models.coca as coca_module
    from uap.distributed import alone

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        out = {"coca": _steps()}
        original = coca_module.clip_loss

        def local(*args, **kwargs):
            with alone():
                return original(*args, **kwargs)

        with mock.patch.object(coca_module, "clip_loss", local):
            out["coca-local-negatives"] = _steps()
        if rank == 0:
            torch.save(out, path)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return spawn_two_ranks(_worker, tmp_path_factory.mktemp("dist-coca"))


def _difference(a: dict, b: dict) -> float:
    return max(max(abs(u - v) for u, v in zip(a["losses"], b["losses"])), float((a["params"] - b["params"]).abs().max()))


def test_two_ranks_take_the_one_process_coca_step(two_ranks):
    torch.set_num_threads(1)
    one = _steps()
    assert _difference(two_ranks["coca"], one) <= TOL
    assert _difference(two_ranks["coca-local-negatives"], one) > 100 * TOL
    before = torch.cat([p.detach().flatten() for p in _method().parameters()])
    assert float((one["params"] - before).abs().max()) > 1000 * TOL
