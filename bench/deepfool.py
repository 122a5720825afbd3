"""DeepFool micro-benchmark: ``uap.deepfool`` vs Foolbox's DeepFool on the same images.

Both run batched over ``--batch-size`` images with the same steps, candidates and overshoot;
reported: images/s, success rate, median ‖r‖₂ (of successful rows) and the speed ratio.

    python -m bench.deepfool --model supervised --n-images 1000 --norm 2

Where the time goes: Foolbox computes the gradient of each candidate's logit difference with
its own forward+backward (``candidates − 1`` forward and backward passes per step);
``uap.deepfool`` shares one forward pass between all candidates (on the CPU one backward per
candidate over that graph, on CUDA one vmapped backward) and drops rows as soon as they are
fooled. ``uap.deepfool bf16`` is the same call with ``precision="bf16"`` (gradients under
bfloat16 autocast, decisions in fp32); ``uap.deepfool, BN folded`` runs the fp32 call on
``uap.fold_batchnorm(model)`` (what ``uap.craft`` attacks), the same function up to rounding.
"""
from __future__ import annotations

import functools
import math

import torch

from bench.common import base_parser, load_images, parse_norm, print_table, setup, timer, write_results
from uap import deepfool, fold_batchnorm

STEPS, CANDIDATES, OVERSHOOT = 50, 10, 0.02


def run_foolbox(model, x, norm: float, batch_size: int):
    import foolbox as fb

    fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0))
    cls = fb.attacks.LinfDeepFoolAttack if math.isinf(norm) else fb.attacks.L2DeepFoolAttack
    attack = cls(steps=STEPS, candidates=CANDIDATES, overshoot=OVERSHOOT)
    with torch.no_grad():
        labels = model(x).argmax(1)
    rs, oks = [], []
    for xb, lb in zip(x.split(batch_size), labels.split(batch_size)):
        _, adv, ok = attack(fmodel, xb, fb.criteria.Misclassification(lb), epsilons=None)
        rs.append(adv - xb)
        oks.append(ok)
    return torch.cat(rs), torch.cat(oks)


def run_uap(model, x, norm: float, batch_size: int, precision: str = "fp32"):
    rs, oks = [], []
    for xb in x.split(batch_size):
        r, ok = deepfool(model, xb, norm=norm, candidates=CANDIDATES, overshoot=OVERSHOOT, max_iter=STEPS,
                         precision=precision)
        rs.append((xb + r).clamp(0, 1) - xb)  # the same quantity Foolbox returns: clipped adversarial − x
        oks.append(ok)
    return torch.cat(rs), torch.cat(oks)


def main(argv: list[str] | None = None) -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--n-images", type=int, default=1000)
    ap.add_argument("--norm", type=parse_norm, default=2.0)
    ap.add_argument("--batch-size", type=int, default=100)
    args = ap.parse_args(argv)
    model = setup(args)
    x, _ = load_images(args, "test", args.n_images)
    run_uap(model, x[:8], args.norm, args.batch_size)  # untimed: PyTorch's one-time kernel setup
    run_uap(model, x[:8], args.norm, args.batch_size, "bf16")
    folded = fold_batchnorm(model, x[:8])
    run_uap(folded, x[:8], args.norm, args.batch_size)
    results = {}
    bf16 = functools.partial(run_uap, precision="bf16")
    contenders = [("uap.deepfool", model, run_uap), ("uap.deepfool bf16", model, bf16),
                  ("uap.deepfool, BN folded", folded, run_uap), ("Foolbox DeepFool", model, run_foolbox)]
    for name, target, fn in contenders:
        with timer() as t:
            r, ok = fn(target, x, args.norm, args.batch_size)
        norms = r.flatten(1).norm(dim=1)[ok]
        results[name] = {
            "seconds": t["seconds"], "images_per_s": len(x) / t["seconds"], "success_rate": ok.float().mean().item(),
            "median_l2": norms.median().item() if len(norms) else None,
        }
    base = results["uap.deepfool"]["images_per_s"]
    for r in results.values():
        r["speed_vs_foolbox"] = r["images_per_s"] / results["Foolbox DeepFool"]["images_per_s"]
        r["speed_vs_uap"] = r["images_per_s"] / base
    print_table(
        f"DeepFool ({'ℓ∞' if math.isinf(args.norm) else 'ℓ2'}) on {args.model}, {args.n_images} test images, "
        f"batches of {args.batch_size}, {STEPS} steps, {CANDIDATES} candidates, overshoot {OVERSHOOT}",
        ["implementation", "seconds", "images/s", "× Foolbox", "success", "median ‖r‖₂"],
        [[k, r["seconds"], r["images_per_s"], r["speed_vs_foolbox"], r["success_rate"], r["median_l2"]]
         for k, r in results.items()],
    )
    write_results(f"deepfool-{'linf' if math.isinf(args.norm) else 'l2'}", args, results)


if __name__ == "__main__":
    main()
