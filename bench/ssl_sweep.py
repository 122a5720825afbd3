"""Hyper-parameter sweep for the self-supervised zoo methods: many short runs side by side.

Each run is the ordinary training loop (:func:`models.train.train`) on the CIFAR-10 training
split minus a fixed held-out part, with the kNN monitor (bank: 5 000 training images; queries:
2 000 held-out training images, never the test split). Runs are separate processes, started
together; on a GPU they share the device. Runs still going at ``--deadline`` are stopped and
report the epochs they finished. This is how the zoo's BYOL/MoCo/DINO settings were chosen
(README, "Zoo"):

    python -m bench.ssl_sweep --device cuda --epochs 25 --deadline 480 --out runs/sweep/sweep.json

Not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# The DINO runs of the sweep predate the current defaults: 4 local crops, teacher τ 0.04 → 0.07.
_DINO_PAPER_CROPS_TEMP = {"n_local": 4, "teacher_temp": 0.07}
RUNS: dict[str, dict] = {
    "byol-sgd0.06-m0.99": dict(method="byol", lr=0.06, hparams={"momentum": 0.99}),
    "byol-sgd0.15-m0.96": dict(method="byol", lr=0.15, hparams={"momentum": 0.96}),
    "byol-sgd0.3-m0.99": dict(method="byol", lr=0.3, hparams={"momentum": 0.99}),
    "byol-sgd0.3-m0.96": dict(method="byol", lr=0.3, hparams={"momentum": 0.96}),
    "byol-lars1.0-m0.99": dict(method="byol", optimizer="lars", lr=1.0, weight_decay=1e-5, hparams={"momentum": 0.99}),
    "moco-sgd0.12-t0.2": dict(method="moco", lr=0.12, hparams={"temperature": 0.2}),
    "moco-sgd0.06-t0.1": dict(method="moco", lr=0.06, hparams={"temperature": 0.1}),
    "moco-sgd0.12-t0.2-nosplit": dict(method="moco", lr=0.12, hparams={"temperature": 0.2, "bn_splits": 1}),
    "dino-paper": dict(method="dino", lr=5e-4, hparams={"momentum": 0.996, "out_dim": 1024, **_DINO_PAPER_CROPS_TEMP}),
    "dino-zoo": dict(method="dino"),  # the current defaults (the zoo's setting)
    "dino-adamw1e-3-m0.99-k4096": dict(method="dino", lr=1e-3, hparams={"momentum": 0.99, "out_dim": 4096, **_DINO_PAPER_CROPS_TEMP}),
    "dino-lars0.3-m0.99-k4096": dict(method="dino", optimizer="lars", lr=0.3, weight_decay=1e-6,
                                     hparams={"momentum": 0.99, "out_dim": 4096, **_DINO_PAPER_CROPS_TEMP}),
    "dino-sgd0.06-m0.99": dict(method="dino", optimizer="sgd", lr=0.06, weight_decay=5e-4, hparams={"momentum": 0.99, "out_dim": 1024, **_DINO_PAPER_CROPS_TEMP}),
}
HELD_OUT = 5000


def _split(n_images: int | None):
    """(train x, train y, held-out x, held-out y): a fixed permutation of the training split."""
    import torch

    from uap.data import load

    x, y, _ = load("cifar10", "train")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    if n_images is not None:
        perm = perm[:n_images]
    held = min(HELD_OUT, len(perm) // 10)
    return x[perm[held:]], y[perm[held:]], x[perm[:held]], y[perm[:held]]


def run_one(name: str, args: argparse.Namespace) -> None:
    """One run of the sweep (a child process); its history lands in the run's checkpoint state
    (``workdir/name/`` + :data:`models.train.STATE_NAME`)."""
    import torch

    from models.train import TrainConfig, train

    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    tx, ty, hx, hy = _split(args.n_images)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, width=16, seed=0, knn_every=args.knn_every,
                         threads=args.threads, precision=args.precision, **RUNS[name])
    train(config, Path(args.workdir) / name, data=(tx, ty), monitor_data=(tx[:5000], ty[:5000], hx[:2000], hy[:2000]),
          device=args.device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", help=f"run names (default: all): {', '.join(RUNS)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--knn-every", type=int, default=5)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    parser.add_argument("--n-images", type=int, default=None, help="use this many training images (smoke tests)")
    parser.add_argument("--deadline", type=float, default=480.0, help="seconds; runs still going are stopped")
    parser.add_argument("--workdir", default="runs/sweep/work")
    parser.add_argument("--out", default="runs/sweep/sweep.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_one(args.child, args)
        return
    from models.train import STATE_NAME

    names = args.runs or list(RUNS)
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        parser.error(f"unknown run(s) {unknown}; known: {', '.join(RUNS)}")
    _split(args.n_images)  # decode (and cache) the data once, before the children start
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in names]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    procs = {n: subprocess.Popen([sys.executable, "-m", "bench.ssl_sweep", *passthrough, "--child", n],
                                 stdout=open(workdir / f"{n}.log", "w"), stderr=subprocess.STDOUT) for n in names}
    while time.time() - started < args.deadline and any(p.poll() is None for p in procs.values()):
        time.sleep(2)
    for p in procs.values():
        if p.poll() is None:
            p.kill()
    results = {}
    for n in names:
        state = workdir / n / STATE_NAME
        history = json.loads(state.read_text())["history"] if state.is_file() else []
        results[n] = {"config": RUNS[n], "epochs_done": len(history),
                      "knn": {h["epoch"]: h["knn_acc"] for h in history if "knn_acc" in h},
                      "images_per_s": history[-1]["images_per_s"] if history else None}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": args.device, "epochs": args.epochs, "runs": results}, indent=2) + "\n")
    for n, r in results.items():
        knn = "  ".join(f"ep{e} {100 * a:.1f}" for e, a in r["knn"].items())
        print(f"{n:32s} {r['epochs_done']:3d} epochs  kNN: {knn or '-'}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
