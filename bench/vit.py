"""ViT training benchmark: DINO's packed vs per-crop multi-crop step; skip vs compute-and-mask drop path.

Two comparisons on the same ViT, each against a baseline measured in the same run:

1. **DINO step** (multi-crop augmentation, student and teacher forwards, loss, backward,
   AdamW step, EMA update: :func:`models.train.optimisation_step`, fp32) of DINO on the zoo
   ViT (``vit_small``: :func:`models.backbones.vit_small_cifar`), ``-H packed=true``
   (one packed forward over all crops, :meth:`~models.backbones.VisionTransformer.forward_packed`,
   its crops kept apart by segment attention or by a dense block-diagonal mask)
   against ``packed=false`` (one forward per crop resolution), on 2 global 32×32 and
   ``--n-local`` local 16×16 crops of ``--batch-size`` images. Each variant runs in a fresh
   child process per round, the two alternating (``--repeats`` rounds, order reversed every
   other round) so that load on the machine affects both alike; the step time is the median
   over all timed steps. Peak memory of a step is measured in the same child, over a baseline
   taken after a warm-up step on 2 images (model, AdamW state and allocator in place): on CUDA
   ``torch.cuda.max_memory_allocated`` minus the memory allocated at the baseline; on the CPU
   the growth of the process's peak resident set size (``ru_maxrss``) over the baseline.
2. **Stochastic depth**: forward + backward of the same ViT on a batch of 32×32 images with
   the library's :class:`~models.backbones.Block`, which runs a residual branch only on the
   kept samples, against a compute-and-mask block defined here (the branch on every sample,
   multiplied by a keep mask / (1 − p)), at each ``--drop-rates`` rate, and without drop as the
   reference. For this comparison the rate is the same in every block (the library's ViT
   ramps it linearly from 0 in the first block). Steps alternate over the variants in one
   process; medians.

Images are random pixels: a step's cost does not depend on what they show. Prints
tables and writes ``runs/bench/vit.json``.

    python -m bench.vit --batch-size 64 --n-local 6 --repeats 3 --steps 5 --threads 2
    python -m bench.vit --device cuda --batch-size 256 --n-local 10
    python -m bench.vit --batch-size 4 --repeats 1 --steps 1 --warmup 0   # a quick check
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

from bench.common import machine, print_table, write_results
from models.backbones import Block, VisionTransformer, build_backbone

#: DINO variants: packed with segment attention, packed with a dense block-diagonal mask, per crop
VARIANTS = ("packed-segments", "packed-mask", "per-crop")


class ComputeAndMaskBlock(Block):
    """:class:`Block` with stochastic depth done the plain way: the residual branch runs on
    every sample, then dropped samples are zeroed by a keep mask (kept ones scaled by 1/(1 − p))."""

    def _residual(self, x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor], norm) -> torch.Tensor:
        if not self.training or self.drop_path == 0.0:
            return x + branch(norm(x))
        keep = (torch.rand(x.shape[0], 1, 1, device=x.device) >= self.drop_path).to(x.dtype)
        return x + branch(norm(x)) * (keep / (1.0 - self.drop_path))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- 1. DINO step, one child per run


def _memory_baseline(device: torch.device) -> float:
    """The memory mark a step's peak is measured from, in MB (and, on CUDA, the peak reset)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _memory_peak(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _dino_child(args: argparse.Namespace) -> dict:
    """Child process: DINO steps of one variant; their times and the peak memory over the baseline."""
    from models.methods.dino import DINO
    from models.train import build_optimizer, optimisation_step

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    method = DINO(build_backbone("vit_small"), n_local=args.n_local, packed=args.child != "per-crop").to(device).train()
    if args.child != "per-crop":
        for vit in (method.backbone, method.teacher_backbone):
            vit.packed_attention = args.child.removeprefix("packed-")
    optimizer = build_optimizer(method, "adamw", 1e-4, 0.04)
    x = torch.rand(args.batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed)).to(device)
    y = torch.zeros(args.batch_size, dtype=torch.long, device=device)
    total = args.warmup + args.steps + 1
    optimisation_step(method, optimizer, x[:2], y[:2], 0, total)  # AdamW state, kernels, allocator
    base = _memory_baseline(device)
    times = []
    for i in range(args.warmup + args.steps):
        _sync(device)
        t0 = time.perf_counter()
        optimisation_step(method, optimizer, x, y, i + 1, total)
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"variant": args.child, "step_seconds": times, "peak_mb": _memory_peak(device) - base}


def _dino_rounds(args: argparse.Namespace) -> dict[str, dict]:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runs: dict[str, dict] = {v: {"step_seconds": [], "peak_mb": []} for v in VARIANTS}
    for r in range(args.repeats):
        for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            command = [sys.executable, "-m", "bench.vit", "--child", variant, "--device", args.device,
                       "--batch-size", str(args.batch_size), "--n-local", str(args.n_local),
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
                       "--seed", str(args.seed)]
            done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"the {variant} run failed (exit {done.returncode}):\n{done.stderr.strip()[-2000:]}")
            run = json.loads(done.stdout.strip().splitlines()[-1])
            runs[variant]["step_seconds"] += run["step_seconds"]
            runs[variant]["peak_mb"].append(run["peak_mb"])
    return runs


# --------------------------------------------------------------------------- 2. stochastic depth, in process


def _uniform_drop(vit: VisionTransformer, p: float) -> None:
    for block in vit.blocks:
        block.drop_path = p


def _drop_path_times(args: argparse.Namespace, device: torch.device) -> dict[str, list[float]]:
    torch.manual_seed(args.seed)
    skip = build_backbone("vit_small").to(device).train()
    masked = copy.deepcopy(skip)
    for block in masked.blocks:
        block.__class__ = ComputeAndMaskBlock  # same weights, the other drop implementation
    x = torch.rand(args.batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed)).to(device)
    variants: dict[str, tuple[VisionTransformer, float]] = {"no drop": (skip, 0.0)}
    for p in args.drop_rates:
        variants[f"skip, p={p:g}"] = (skip, p)
        variants[f"compute-and-mask, p={p:g}"] = (masked, p)

    def step(model: VisionTransformer, p: float) -> float:
        _uniform_drop(model, p)
        model.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        model(x).square().mean().backward()
        _sync(device)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.warmup + args.steps * args.repeats):
        for name, (model, p) in variants.items():
            t = step(model, p)
            if i >= args.warmup:
                times[name].append(t)
    return times


# --------------------------------------------------------------------------- output


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--batch-size", type=int, default=64, help="images per step (each gives 2 + n-local crops)")
    ap.add_argument("--n-local", type=int, default=6, help="local 16×16 crops per image (the method's default is 2)")
    ap.add_argument("--drop-rates", type=lambda s: [float(p) for p in s.split(",")], default=[0.1, 0.3],
                    help="stochastic-depth rates compared, comma-separated (the same rate in every block)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds (DINO: a fresh process per variant each)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (per child for DINO)")
    ap.add_argument("--parts", default="dino,drop_path", help="which comparisons: dino, drop_path or both")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON file for the results (default runs/bench/vit.json)")
    ap.add_argument("--child", default=None, choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:  # one DINO variant, in this process
        print(json.dumps(_dino_child(args)))
        return
    parts = set(args.parts.split(","))
    if not parts or parts - {"dino", "drop_path"}:
        ap.error(f"--parts takes dino and/or drop_path, got {args.parts!r}")
    if args.batch_size < 2 or args.repeats < 1 or args.steps < 1 or args.warmup < 0 or args.n_local < 0:
        ap.error("need --batch-size ≥ 2, --repeats ≥ 1, --steps ≥ 1, --warmup ≥ 0, --n-local ≥ 0")
    if any(not 0.0 < p < 1.0 for p in args.drop_rates):
        ap.error("--drop-rates must lie in (0, 1)")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = f"{device}, torch threads: {args.threads}" if device.type == "cpu" else str(device)
    results: dict = {"machine": machine()}

    if "dino" in parts:
        runs = _dino_rounds(args)
        base = statistics.median(runs["per-crop"]["step_seconds"])
        memory = ("CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS (ru_maxrss)") + \
            " over the baseline after a 2-image warm-up step, fresh process per run"
        rows = []
        for variant in VARIANTS:
            s = statistics.median(runs[variant]["step_seconds"])
            mb = statistics.median(runs[variant]["peak_mb"])
            runs[variant].update(median_step_seconds=s, images_per_s=args.batch_size / s,
                                 speedup_vs_per_crop=base / s, median_peak_mb=mb)
            rows.append([variant, f"{1000 * s:.1f}", f"{args.batch_size / s:.1f}", f"{base / s:.2f}", f"{mb:.0f}"])
        results["dino"] = {"memory": memory, **runs}
        print_table(f"DINO step, vit_small, batch {args.batch_size}, 2 × 32² + {args.n_local} × 16² crops, fp32, {where}; "
                  f"median of {args.repeats} × {args.steps} steps; memory: {memory}",
                  ["variant", "ms / step", "images/s", "× per-crop speed", "peak memory (MB)"], rows)

    if "drop_path" in parts:
        times = _drop_path_times(args, device)
        med = {name: statistics.median(t) for name, t in times.items()}
        rows = [["no drop", f"{1000 * med['no drop']:.1f}", "1.00", "—"]]
        for p in args.drop_rates:
            mask = med[f"compute-and-mask, p={p:g}"]
            for name in (f"skip, p={p:g}", f"compute-and-mask, p={p:g}"):
                rows.append([name, f"{1000 * med[name]:.1f}", f"{med['no drop'] / med[name]:.2f}",
                             f"{mask / med[name]:.2f}"])
        results["drop_path"] = {name: {"median_seconds": med[name], "all_seconds": times[name]} for name in times}
        print_table(f"vit_small forward + backward, batch {args.batch_size} × 32², {where}; stochastic depth at the same "
                  f"rate in every block; median of {args.repeats * args.steps} alternating steps",
                  ["variant", "ms / step", "× no-drop speed", "× compute-and-mask speed"], rows)

    write_results("vit", args, results)


if __name__ == "__main__":
    main()
