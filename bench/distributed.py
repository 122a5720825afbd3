"""Communication against compute for the distributed paths, measured on 2 gloo processes over
loopback, and a ring all-reduce cost model that predicts 8, 64 and 512 ranks.

Per step of four workloads — an SGD-UAP minibatch (``uap craft --method sgd``), a
deepfool-batched minibatch, an evaluation pass and a SimCLR training step (DDP) — it reports

- the bytes each rank sends into collectives, from the tensor sizes: every ``all_reduce``,
  ``all_gather`` and ``broadcast`` the step makes through :mod:`torch.distributed` is counted
  as it happens, and DDP's gradient all-reduce (made inside its C++ reducer) is counted as the
  trainable parameters' bytes;
- the time the step spends in those collectives (DDP's all-reduce timed as one all-reduce of
  the gradients' size), the whole step on 2 ranks, and the step's compute alone (the same
  share of the work in one process, without collectives);

and, from the measured one-rank compute and the counted messages, predicts the step time on
``P`` = 8, 64, 512 ranks with the global batch fixed (strong scaling: compute / P). The model
(α–β, ring algorithms): an all-reduce of ``M`` bytes costs ``2(P − 1)·α + 2(P − 1)/P · M/β``,
an all-gather whose result is ``M`` bytes ``(P − 1)·α + (P − 1)/P · M/β``, a broadcast
``log2(P)·α + M/β`` (tree). Two link profiles: ``ethernet`` (α = 50 µs, β = 1.25 GB/s,
10 GbE TCP as gloo across nodes) and ``infiniband`` (α = 5 µs, β = 12.5 GB/s, 100 Gb/s
RDMA as NCCL across nodes). No overlap of communication with compute is assumed (DDP's
bucketing overlaps part of the gradient all-reduce, so the training prediction is an upper
bound).

    python -m bench.distributed --batch-size 256 --eval-images 2000 --steps 5 --out runs/bench/distributed.json

Tiny check (seconds): ``python -m bench.distributed --tiny``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PROFILES = {"ethernet": (50e-6, 1.25e9), "infiniband": (5e-6, 12.5e9)}
RANKS = (8, 64, 512)


# --------------------------------------------------------------------------- counting collectives


class Traffic:
    """Collectives made through ``torch.distributed`` while :meth:`counting`: kind, bytes, seconds."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, float]] = []

    @contextlib.contextmanager
    def counting(self) -> Iterator["Traffic"]:
        originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "broadcast")}

        def wrap(name: str, fn: Callable) -> Callable:
            def counted(*args, **kwargs):
                tensors = args[0] if name == "all_gather" else [args[0]]
                size = sum(t.numel() * t.element_size() for t in tensors)  # all_gather: the gathered result
                t0 = time.perf_counter()
                out = fn(*args, **kwargs)
                self.calls.append((name, size, time.perf_counter() - t0))
                return out
            return counted

        for name, fn in originals.items():
            setattr(dist, name, wrap(name, fn))
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)

    def summary(self) -> dict:
        kinds: dict[str, dict] = {}
        for name, size, seconds in self.calls:
            k = kinds.setdefault(name, {"calls": 0, "bytes": 0, "seconds": 0.0})
            k["calls"] += 1
            k["bytes"] += size
            k["seconds"] += seconds
        return kinds


def predict(messages: dict, compute_1: float, ranks: int, alpha: float, beta: float) -> float:
    """Step time on ``ranks`` ranks: one-rank compute / ranks + the α–β cost of the messages."""
    p = ranks
    comm = 0.0
    for name, k in messages.items():
        size = k["bytes"] / max(1, k["calls"])
        if name == "all_reduce":
            per = 2 * (p - 1) * alpha + 2 * (p - 1) / p * size / beta
        elif name == "all_gather":
            per = (p - 1) * alpha + (p - 1) / p * size / beta
        else:
            per = math.log2(p) * alpha + size / beta
        comm += k["calls"] * per
    return compute_1 / p + comm


# --------------------------------------------------------------------------- workloads


def _workloads(args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    """name → one step of the workload (run on every rank: the collectives are inside)."""
    import uap
    from models.parallel import parallelize, rank_rows, rank_share
    from models.train import TrainConfig, build_method, build_optimizer, optimisation_step, sync_batchnorm_if_distributed
    from tests.tiny_models import tiny_cnn

    g = torch.Generator().manual_seed(0)
    side = args.image_size
    x = torch.rand(args.batch_size, 3, side, side, generator=g)
    x_eval = torch.rand(args.eval_images, 3, side, side, generator=g)
    target = tiny_cnn() if args.tiny else uap.targets.resolve_model(args.model)[0]
    common = dict(eps=8 / 255, max_passes=1, delta=0.01, seed=0)  # one pass of one minibatch (and its fooling-rate count)

    def sgd() -> None:
        uap.craft(target, x, method="sgd", method_options={"batch_size": args.batch_size}, **common)

    def deepfool_batched() -> None:
        uap.craft(target, x, method="deepfool-batched", method_options={"batch_size": args.batch_size, "max_iter": 10},
                  **common)

    def evaluation() -> None:
        uap.evaluate({"v": torch.zeros(3, side, side)}, {"m": target}, x_eval)
        uap.metrics.DEFAULT_CACHE.clear()  # every repetition measures the clean pass too

    config = TrainConfig(method="simclr", width=args.width, batch_size=args.batch_size).resolved()
    method = sync_batchnorm_if_distributed(build_method(config)).train()
    stepper = parallelize(method, "ddp")
    optimizer = build_optimizer(method, config.optimizer, config.lr, config.weight_decay)
    rows, share = rank_rows(args.batch_size), rank_share(args.batch_size)
    labels = torch.zeros(args.batch_size, dtype=torch.long)
    counter = iter(range(10**9))

    def simclr() -> None:
        optimisation_step(method, optimizer, x[rows], labels[rows], next(counter), 10**6, forward=stepper, share=share)

    simclr.gradient_bytes = sum(p.numel() * p.element_size() for p in method.parameters() if p.requires_grad)
    return {"sgd": sgd, "deepfool-batched": deepfool_batched, "evaluate": evaluation, "simclr-step": simclr}


def _time(fn: Callable[[], None], steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(rank: int, port: int, args: argparse.Namespace, path: str) -> None:
    from uap.distributed import alone, shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {}
    try:
        for name, step in _workloads(args).items():
            traffic = Traffic()
            with traffic.counting():
                step()  # one counted step (warm)
            messages = traffic.summary()
            per_step = {k: dict(v) for k, v in messages.items()}
            if hasattr(step, "gradient_bytes"):  # DDP's reducer all-reduces the gradients in C++
                grads = torch.zeros(step.gradient_bytes // 4)
                reduce_s = _time(lambda: dist.all_reduce(grads), args.steps)
                k = per_step.setdefault("all_reduce", {"calls": 0, "bytes": 0, "seconds": 0.0})
                k["calls"] += 1
                k["bytes"] += step.gradient_bytes
                k["seconds"] += reduce_s
            two = _time(step, args.steps)
            results[name] = {"messages": per_step, "step_2_ranks_s": two,
                             "comm_s": sum(k["seconds"] for k in per_step.values()),
                             "bytes": sum(k["bytes"] for k in per_step.values())}
        # the compute alone: this rank's share of each workload in one process, no collectives
        if rank == 0:
            with alone():
                for name, step in _workloads(_share_of(args, shard)).items():
                    results[name]["compute_1_rank_share_s"] = _time(step, args.steps)
            with open(path, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def _share_of(args: argparse.Namespace, shard) -> argparse.Namespace:
    """The same workloads at one rank's share of the images (rank 0 of 2)."""
    half = argparse.Namespace(**vars(args))
    half.batch_size = args.batch_size // 2
    half.eval_images = args.eval_images // 2
    return half


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="supervised", help="crafting/evaluation target (zoo name or module:factory)")
    ap.add_argument("--batch-size", type=int, default=256, help="global minibatch of every workload")
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--width", type=int, default=16, help="SimCLR ResNet-18 width")
    ap.add_argument("--steps", type=int, default=5, help="timed repetitions (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes and a tiny target: checks the script in seconds")
    ap.add_argument("--out", default="runs/bench/distributed.json")
    args = ap.parse_args()
    if args.tiny:
        args.batch_size, args.eval_images, args.width, args.steps = 16, 32, 2, 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "rank0.json")
        mp.spawn(_worker, args=(port, args, path), nprocs=2, join=True)
        results = json.loads(Path(path).read_text())
    for r in results.values():
        compute_1 = 2 * r["compute_1_rank_share_s"]  # the whole workload's compute on one rank
        r["compute_1_rank_s"] = compute_1
        r["predicted_step_s"] = {prof: {str(p): predict(r["messages"], compute_1, p, a, b) for p in RANKS}
                                 for prof, (a, b) in PROFILES.items()}
    out = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "profiles": PROFILES, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from uap.atomic import atomic_write

    atomic_write(Path(args.out), json.dumps(out, indent=2))
    print(f"{'workload':18} {'bytes/step':>12} {'comm s':>9} {'2-rank s':>9} {'compute/rank s':>15}  "
          + "  ".join(f"P={p} ({prof[:3]})" for prof in PROFILES for p in RANKS))
    for name, r in results.items():
        preds = "  ".join(f"{r['predicted_step_s'][prof][str(p)]:>12.4f}" for prof in PROFILES for p in RANKS)
        print(f"{name:18} {r['bytes']:>12,d} {r['comm_s']:>9.4f} {r['step_2_ranks_s']:>9.4f} "
              f"{r['compute_1_rank_share_s']:>15.4f}  {preds}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
