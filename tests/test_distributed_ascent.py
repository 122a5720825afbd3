"""Two gloo processes give the one-process result for the ascent methods beyond ``sgd``'s default:
``sga`` (its inner minibatches split over the ranks), ``cos-uap`` and ``sgd``'s other losses."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist

import uap
from tests.test_distributed import spawn_two_ranks
from tests.tiny_models import tiny_mlp

SGA = {"batch_size": 12, "inner_batch_size": 5, "inner_steps": 2}
RUNS = {
    "sga": dict(method="sga", eps=0.06, norm=math.inf, method_options={**SGA, "momentum": 0.9}),
    "sga-l2": dict(method="sga", eps=1.0, norm=2, method_options={**SGA, "inner_batch_size": 3, "loss": "cw"}),
    "sga-targeted": dict(method="sga", eps=0.06, norm=math.inf, target=2, method_options={**SGA, "loss": "logit"}),
    "cos-uap": dict(method="cos-uap", eps=0.06, norm=math.inf, method_options={"batch_size": 9}),
    "cos-uap-l2": dict(method="cos-uap", eps=1.0, norm=2, method_options={"batch_size": 7}),
    "sgd-cw": dict(method="sgd", eps=0.06, norm=math.inf, method_options={"batch_size": 10, "loss": "cw", "beta": 2.0}),
}


def _results() -> dict:
    x = torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    held = torch.rand(30, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    model, out = tiny_mlp(), {}
    for name, kw in RUNS.items():
        pert = uap.craft(model, x, delta=0, max_passes=2, seed=4, heldout=held, **kw)
        out[name] = (pert.v, [{k: r[k] for k in ("fooling_rate", "heldout_fooling_rate", "updates", "visited")}
                              for r in pert.history])
    return out


def _worker(rank: int, size: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        out = _results()
        if rank == 0:
            torch.save(out, path)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return spawn_two_ranks(_worker, tmp_path_factory.mktemp("dist-ascent"))


@pytest.fixture(scope="module")
def one_process():
    torch.set_num_threads(1)
    return _results()


@pytest.mark.parametrize("name", list(RUNS))
def test_two_ranks_craft_the_one_process_v(two_ranks, one_process, name):
    v2, h2 = two_ranks[name]
    v1, h1 = one_process[name]
    assert h2 == h1  # same fooling rates (counted exactly), updates and visits
    torch.testing.assert_close(v2, v1, rtol=0, atol=1e-6)
    assert bool(v1.any())
