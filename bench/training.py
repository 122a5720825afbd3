"""Training-step benchmark: float32 vs bfloat16 autocast (``uap train --precision``), same run.

Times full training steps (augmentation, forward, loss, backward, optimiser step) of a zoo
method on the same batch of CIFAR-10 training images, alternating the two precisions so that
load on the machine affects both alike, and reports the median step time and images/s of each,
with the ratio to float32 measured in this run.

    python -m bench.training --method simclr --batch-size 256 --steps 8 --threads 2
    python -m bench.training --method airbench --backbone airbench --width 64 --batch-size 512 --steps 6 --threads 2
"""
from __future__ import annotations

import statistics
import time

import torch

from bench.common import base_parser, load_images, print_table, write_results
from models.precision import PRECISIONS
from models.train import TrainConfig, build_method, build_optimizer, optimisation_step


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--method", default="simclr")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per precision (after 2 warm-up steps)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    x, y = load_images(args, "train", args.batch_size)
    config = TrainConfig(method=args.method, backbone=args.backbone, width=args.width,
                         batch_size=args.batch_size).resolved()
    runs = {}
    for precision in PRECISIONS:
        method = build_method(config).to(memory_format=torch.channels_last).train()
        method.prepare_data(x, y)  # what the loop does first (airbench fits its whitening layer here)
        runs[precision] = (method, build_optimizer(method, config.optimizer, config.lr, config.weight_decay))

    def step(precision: str, i: int) -> float:
        t0 = time.perf_counter()
        optimisation_step(*runs[precision], x, y, i, 1000, precision)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for i in range(args.steps + 2):
        for precision in PRECISIONS:
            t = step(precision, i)
            if i >= 2:
                times[precision].append(t)
    base = statistics.median(times["fp32"])
    results, rows = {}, []
    for precision in PRECISIONS:
        s = statistics.median(times[precision])
        results[precision] = {"step_seconds": s, "images_per_s": args.batch_size / s, "speedup_vs_fp32": base / s,
                              "all_step_seconds": times[precision]}
        rows.append([precision, s, args.batch_size / s, base / s])
    print_table(f"{args.method} training step ({args.backbone}), batch {args.batch_size}, width {args.width}, "
                f"median of {args.steps}",
                ["precision", "s / step", "images/s", "× fp32"], rows)
    write_results("training", args, results)


if __name__ == "__main__":
    main()
