"""Time and peak memory of one crafting pass on an ImageNet-size torchvision model, on the CPU.

``python -m bench.external`` builds torchvision's ``resnet50`` with random weights (saved to a
file and loaded through the ``torchvision:NAME --weights`` path a user takes), draws
``--images`` images of ``--size``×``--size`` (random pixels: the cost of a pass does not depend
on what the images show), and runs ONE pass of each method (``deepfool-batched``, ``sgd``) in
a fresh child process per method, so each peak resident set size (``ru_maxrss``) is that
method's alone. Reports seconds, images per second and peak RSS per method. Not a test.

Example (what BENCHMARKS.md reports)::

    python -m bench.external --images 256 --threads 2
    python -m bench.external --arch resnet18 --images 8 --size 64   # a quick check
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import base_parser, machine, print_table, write_results

METHODS = ("deepfool-batched", "sgd")


def _one_pass(args: argparse.Namespace) -> dict:
    """Child process: one pass of ``args.method``; returns seconds and peak RSS."""
    import uap
    from uap.targets import resolve_model

    torch.set_num_threads(args.threads)
    model, _ = resolve_model(f"torchvision:{args.arch}", weights=args.weights)
    x = torch.rand(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed))
    options = {"batch_size": args.batch_size}
    start = time.perf_counter()
    pert = uap.craft(model, x, eps=10 / 255, method=args.method, method_options=options, max_passes=1,
                     seed=args.seed)
    seconds = time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
    return {"method": args.method, "seconds": seconds, "images_per_s": args.images / seconds,
            "peak_rss_mb": rss_mb, "fooling_rate": pert.fooling_rate, "deepfool_calls": pert.extra.get("deepfool_calls")}


def main(argv: list[str] | None = None) -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50", help="torchvision architecture (random weights)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32, help="images per DeepFool call / gradient step")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:  # one method, in this process
        args.method = args.child
        print(json.dumps(_one_pass(args)))
        return
    import torchvision

    torch.manual_seed(args.seed)
    rows, results = [], {"arch": args.arch, "images": args.images, "size": args.size, "batch_size": args.batch_size,
                         "machine": machine(), "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / f"{args.arch}.pth"
        torch.save(torchvision.models.get_model(args.arch, weights=None).state_dict(), weights)
        for method in args.methods.split(","):
            command = [sys.executable, "-m", "bench.external", "--child", method, "--weights", str(weights),
                       "--arch", args.arch, "--images", str(args.images), "--size", str(args.size),
                       "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--seed", str(args.seed)]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            results["methods"][method] = r
            rows.append([method, f"{r['seconds']:.1f}", f"{r['images_per_s']:.2f}", f"{r['peak_rss_mb']:.0f}",
                         f"{100 * r['fooling_rate']:.1f} %"])
    print_table(f"one pass, torchvision:{args.arch} (random weights), {args.images} images of {args.size}×{args.size}, "
                f"batch {args.batch_size}, {args.threads} threads",
                ["method", "seconds", "images/s", "peak RSS (MB)", "fooling rate"], rows)
    write_results("external", args, results)


if __name__ == "__main__":
    main()
