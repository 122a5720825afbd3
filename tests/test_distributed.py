"""Two gloo processes give the one-process result: crafting (sgd, deepfool-batched, Algorithm 1)
and evaluation, under a process group the caller initialised."""
from __future__ import annotations

import json

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import uap
from tests.launch import torchrun_command
from tests.tiny_models import tiny_mlp

RUNS = {
    "sgd": dict(method="sgd", eps=0.06, norm=math.inf, max_passes=2, method_options={"batch_size": 10}),
    "sgd-l2": dict(method="sgd", eps=1.0, norm=2, max_passes=2, method_options={"batch_size": 7}),
    "deepfool-batched": dict(method="deepfool-batched", eps=0.06, norm=math.inf, max_passes=2,
                             method_options={"batch_size": 9, "max_iter": 5}),
    "deepfool": dict(method="deepfool", eps=0.06, norm=math.inf, max_passes=2, method_options={"max_iter": 5}),
}


def _images(n: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _results() -> dict:
    model, x, held = tiny_mlp(), _images(), _images(30, seed=2)
    out = {}
    for name, kw in RUNS.items():
        pert = uap.craft(model, x, delta=0.01, seed=4, heldout=held, **kw)
        out[name] = (pert.v, [{k: r[k] for k in ("fooling_rate", "heldout_fooling_rate", "updates", "visited",
                                                 "deepfool_calls")} for r in pert.history])
    v = out["sgd"][0]
    out["evaluate"] = uap.evaluate({"v": v}, {"m": model}, held, torch.arange(30) % 5).fooling_rate.tolist()
    out["predict"] = uap.predict(model, held, v)
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_two_ranks(worker, folder) -> dict:
    """Run ``worker(rank, 2, port, path)`` on two spawned processes; returns what rank 0 saved at ``path``."""
    path = str(folder / "rank0.pt")
    for attempt in range(3):  # the free port can be taken between its probe and rank 0's bind
        try:
            mp.spawn(worker, args=(2, _free_port(), path), nprocs=2, join=True)
            break
        except mp.ProcessRaisedException as e:
            if "address already in use" not in str(e).lower() or attempt == 2:
                raise
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return spawn_two_ranks(_worker, tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def one_process():
    torch.set_num_threads(1)
    return _results()


@pytest.mark.parametrize("name", list(RUNS))
def test_two_ranks_craft_the_one_process_v(two_ranks, one_process, name):
    v2, h2 = two_ranks[name]
    v1, h1 = one_process[name]
    assert h2 == h1  # same fooling rates (counted exactly), updates, visits and DeepFool calls
    torch.testing.assert_close(v2, v1, rtol=0, atol=1e-6)


def test_two_ranks_evaluate_to_the_count(two_ranks, one_process):
    assert two_ranks["evaluate"] == one_process["evaluate"]
    assert torch.equal(two_ranks["predict"], one_process["predict"])


def _share_worker(rank: int, size: int, port: int, path: str) -> None:
    from uap.perturbation import Perturbation, share_perturbation

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        mine = Perturbation(v=torch.full((3, 2, 2), 0.01 * (rank + 1)), model=f"rank {rank}", eps=0.1,
                            history=[{"pass": 1, "fooling_rate": 0.5}], extra={"run": {"rank": rank}})
        sent, info = share_perturbation(mine if rank == 1 else None, src=1, reused=rank == 1)
        nothing, decision = share_perturbation(None, src=0, action="fresh" if rank == 0 else "ignored")
        if rank == 0:
            torch.save({"v": sent.v, "model": sent.model, "history": sent.history, "extra": sent.extra,
                        "reused": info["reused"], "nothing": nothing is None, "action": decision["action"]}, path)
    finally:
        dist.destroy_process_group()


def test_a_perturbation_is_shared_from_the_rank_that_has_it(tmp_path):
    got = spawn_two_ranks(_share_worker, tmp_path)
    assert torch.equal(got["v"], torch.full((3, 2, 2), 0.02))  # rank 1's tensor, bit for bit
    assert got["model"] == "rank 1" and got["history"] == [{"pass": 1, "fooling_rate": 0.5}]
    assert got["extra"] == {"run": {"rank": 1}} and got["reused"] is True
    assert got["nothing"] and got["action"] == "fresh"  # rank 0's info, and no tensor when it has none


def _torchrun(args: list[str], data_root, timeout: float = 120):
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "UAP_DIST_TIMEOUT": "30"}
    cmd = [*torchrun_command(2), *args, "--data-root", str(data_root)]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


CRAFT = ["craft", "--model", "tests.tiny_models:tiny_cnn", "--n-images", "20", "--heldout", "20",
         "--max-passes", "2", "--method", "sgd", "--batch-size", "7"]


def test_uap_craft_under_torchrun_writes_the_one_process_result_once(tmp_path, data_root):
    from typer.testing import CliRunner

    from cli import app

    done = _torchrun([*CRAFT, "--out", str(tmp_path / "two")], data_root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("fooling rate (held-out)") == 1  # only rank 0 prints
    single = CliRunner().invoke(app, [*CRAFT, "--out", str(tmp_path / "one"), "--data-root", str(data_root)])
    assert single.exit_code == 0, single.output
    two = uap.Perturbation.load(tmp_path / "two" / "perturbation.safetensors")
    one = uap.Perturbation.load(tmp_path / "one" / "perturbation.safetensors")
    torch.testing.assert_close(two.v, one.v, rtol=0, atol=1e-6)
    assert [r["fooling_rate"] for r in two.history] == [r["fooling_rate"] for r in one.history]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_uap_audit_under_torchrun_is_the_one_process_audit(tmp_path, data_root):
    """Every crafting run and every measurement of an audit is the one-process one, and rank 0
    alone writes the report."""
    from typer.testing import CliRunner

    from cli import app

    args = ["audit", "--models", "tests.tiny_models:tiny_cnn", "--quick", "--n-craft", "16", "--n-images", "18",
            "--batch-size", "7"]
    done = _torchrun([*args, "--out", str(tmp_path / "two")], data_root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("worst case") == 1  # only rank 0 prints
    single = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "one"), "--data-root", str(data_root)])
    assert single.exit_code == 0, single.output
    two, one = (json.loads((tmp_path / k / "audit.json").read_text()) for k in ("two", "one"))
    rows = {k: [(r["attack"], r["fooling_rate"], r["accuracy"]) for r in d["models"]["tiny_cnn"]["rows"]]
            for k, d in (("two", two), ("one", one))}
    assert rows["two"] == rows["one"] and len(rows["one"]) > 3


def test_a_failing_rank_ends_the_job_with_one_line_and_no_output(tmp_path, data_root):
    out = tmp_path / "failed"
    args = [*CRAFT, "--out", str(out)]
    args[args.index("tests.tiny_models:tiny_cnn")] = "tests.tiny_models:tiny_cnn_failing_on_rank_1"
    done = _torchrun(args, data_root)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert any("refuses to build on rank 1" in line for line in ours), done.stderr[-3000:]
    assert any("another rank failed" in line for line in ours), done.stderr[-3000:]
    assert "Traceback (most recent call last):\n  File \"/work" not in done.stderr  # none of ours
    assert not out.exists() or not any(out.iterdir())
