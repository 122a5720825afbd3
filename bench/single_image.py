"""Algorithm 1's inner call: DeepFool on ONE image, per gradient mode, with and without BN folding.

Exact Algorithm 1 (``craft(method="deepfool")``) calls DeepFool once per unfooled image, so
its speed is the speed of a one-image DeepFool call, which per-call overhead dominates. This
benchmark times that call on the same images for every variant, interleaved (repeats of
each variant alternate so that load on the machine affects them alike), and checks that all
variants return the same perturbations.

    python -m bench.single_image --model supervised --n-images 50 --norm inf --repeats 3

Variants: ``loop`` (one forward, one backward per candidate over the shared graph),
``replicate`` (one forward and one backward over ``candidates − 1`` copies of the image;
what ``gradients="auto"`` picks for small calls on the CPU), each on the model as given and
on :func:`uap.fusion.fold_batchnorm`'s copy.
"""
from __future__ import annotations

import statistics
import time

import torch

from bench.common import base_parser, load_images, parse_norm, print_table, setup, write_results
from uap import deepfool
from uap.fusion import fold_batchnorm


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--n-images", type=int, default=50)
    ap.add_argument("--norm", default="inf")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = setup(args)
    norm = parse_norm(args.norm)
    x, _ = load_images(args, "test", args.n_images)
    folded = fold_batchnorm(model, check=x[:8])
    variants = {f"{mode}{' + folded BN' if f else ''}": (folded if f else model, mode)
                for f in (False, True) for mode in ("loop", "replicate")}
    times: dict[str, list[float]] = {k: [] for k in variants}
    outputs: dict[str, torch.Tensor] = {}
    for name, (m, mode) in variants.items():  # warm-up (also the outputs to compare)
        outputs[name] = torch.cat([deepfool(m, x[i:i + 1], norm=norm, gradients=mode)[0] for i in range(len(x))])
    for _ in range(args.repeats):
        for name, (m, mode) in variants.items():
            t0 = time.perf_counter()
            for i in range(len(x)):
                deepfool(m, x[i:i + 1], norm=norm, gradients=mode)
            times[name].append((time.perf_counter() - t0) / len(x) * 1000)
    base = statistics.median(times["loop"])
    ref = outputs["loop"]
    rows, results = [], {}
    for name in variants:
        ms = statistics.median(times[name])
        diff = (outputs[name] - ref).abs().max().item()
        rows.append([name, ms, base / ms, diff])
        results[name] = {"ms_per_call": ms, "all_ms_per_call": times[name], "speedup_vs_loop": base / ms,
                         "max_abs_diff_vs_loop": diff}
    print_table(f"one-image DeepFool calls ({args.n_images} images, median of {args.repeats})",
                ["variant", "ms / call", "× loop", "max |Δr| vs loop"], rows)
    write_results("single_image", args, results)


if __name__ == "__main__":
    main()
