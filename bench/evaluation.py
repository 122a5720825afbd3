"""Evaluation benchmark: ``uap.fooling_rate`` throughput vs plain ``model(x)`` inference.

Plain batched inference over the perturbed images is the physical limit for measuring a
fooling rate (it needs one forward pass per image; the clean predictions are cached), so the
ratio says how much overhead the metric adds.

    python -m bench.evaluation --model supervised --n-images 10000
"""
from __future__ import annotations

import torch

from bench.common import base_parser, load_images, print_table, setup, timer, write_results
from uap import fooling_rate
from uap.forward import DEFAULT_BATCH_SIZE
from uap.metrics import clean_predictions


def main(argv: list[str] | None = None) -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--n-images", type=int, default=10000)
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    args = ap.parse_args(argv)
    model = setup(args)
    x, _ = load_images(args, "test", args.n_images)
    v = (torch.rand(x.shape[1:], generator=torch.Generator().manual_seed(0)) * 2 - 1) * 8 / 255
    clean_predictions(model, x, batch_size=args.batch_size)  # cached once, as in real use

    def plain() -> None:
        with torch.no_grad():
            for xb in x.split(args.batch_size):
                model((xb + v).clamp(0, 1)).argmax(1)

    def metric() -> None:
        fooling_rate(model, x, v, batch_size=args.batch_size)

    results = {}
    for name, fn in [("model(x) inference", plain), ("uap.fooling_rate", metric)]:
        best = float("inf")
        for _ in range(args.repeats):
            with timer() as t:
                fn()
            best = min(best, t["seconds"])
        results[name] = {"seconds": best, "images_per_s": len(x) / best}
    limit = results["model(x) inference"]["images_per_s"]
    for r in results.values():
        r["fraction_of_inference"] = r["images_per_s"] / limit
    print_table(
        f"Fooling-rate evaluation on {args.model}, {args.n_images} images, batch {args.batch_size} (best of {args.repeats})",
        ["", "seconds", "images/s", "fraction of plain inference"],
        [[k, r["seconds"], r["images_per_s"], r["fraction_of_inference"]] for k, r in results.items()],
    )
    write_results("evaluation", args, results)


if __name__ == "__main__":
    main()
