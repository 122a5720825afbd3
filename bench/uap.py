"""Crafting benchmark: Algorithm 1 here vs ART vs a Foolbox-DeepFool reference loop.

Every contender gets the identical model object, crafting images, seed, ε, p, δ and pass
budget, in this one process; the held-out fooling rate of each result is then measured the
same way (vs clean predictions on ``--n-heldout`` test images). Times are reported as ratios
against ``craft(method="deepfool")`` from the same run.

    python -m bench.uap --model supervised --n-images 200 --eps 10/255 --norm inf --max-passes 1

Contenders:

- ``uap deepfool`` — ``uap.craft(method="deepfool")``: Algorithm 1 exactly;
- ``uap deepfool-batched`` — ``uap.craft(method="deepfool-batched")``;
- ``… bf16`` — the same with ``method_options={"precision": "bf16"}`` (DeepFool's
  gradients under bfloat16 autocast; every fooled/not-fooled decision in fp32);
- ``… unfolded`` — the same with ``fold_batchnorm=False``: the passes run
  the model as it is instead of its batch-norm-folded copy (``uap.fold_batchnorm``), which
  shows what the folding is worth in this very run;
- ``ART`` — ``art.attacks.evasion.UniversalPerturbation(attacker="deepfool")`` on a
  ``PyTorchClassifier`` with ``clip_values=(0, 1)``, ``y=None`` (fooling vs clean predictions),
  DeepFool with the same steps/candidates/overshoot;
- ``Foolbox loop`` — Algorithm 1 written plainly here, whose inner step is Foolbox's
  ``L2DeepFoolAttack`` called on one image at a time (the same visiting order as ours).
"""
from __future__ import annotations

import functools
import math
import random
from typing import Any

import numpy as np
import torch

from bench.common import base_parser, load_images, parse_eps, parse_norm, print_table, setup, timer, write_results
from uap import craft, fooling_rate, lp_norm, project_lp
from uap.universal import visiting_order
from uap.metrics import DEFAULT_CACHE

STEPS, CANDIDATES, OVERSHOOT = 50, 10, 0.02


def run_uap(model, x, args, method: str, precision: str = "fp32", fold: bool = True) -> dict[str, Any]:
    DEFAULT_CACHE.clear()  # every contender pays for its clean predictions, as ART does
    with timer() as t:
        pert = craft(model, x, eps=args.eps, norm=args.norm, delta=args.delta, max_passes=args.max_passes,
                     method=method, seed=args.seed, method_options={"precision": precision},
                     fold_batchnorm=fold)
    return {"seconds": t["seconds"], "passes": pert.passes, "fooling_rate": pert.fooling_rate, "v": pert.v}


def run_art(model, x, args) -> dict[str, Any]:
    from art.attacks.evasion import UniversalPerturbation
    from art.estimators.classification import PyTorchClassifier

    with torch.no_grad():
        n_classes = model(x[:1]).shape[1]
    classifier = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                   nb_classes=n_classes, clip_values=(0.0, 1.0))
    # ART evaluates the fooling rate on all of X once per pass: count those calls to know the passes.
    passes = {"n": 0}
    predict = classifier.predict

    def counting_predict(xs, *a, **kw):
        if len(xs) == len(x):
            passes["n"] += 1
        return predict(xs, *a, **kw)

    classifier.predict = counting_predict
    attack = UniversalPerturbation(
        classifier, attacker="deepfool",
        attacker_params={"max_iter": STEPS, "nb_grads": CANDIDATES, "epsilon": OVERSHOOT, "verbose": False},
        delta=args.delta, max_iter=args.max_passes, eps=args.eps,
        norm=np.inf if math.isinf(args.norm) else int(args.norm), verbose=False,
    )
    random.seed(args.seed)
    np.random.seed(args.seed)
    xs = x.numpy()
    with timer() as t:
        attack.generate(xs, y=None)
    passes["n"] -= 1  # the first full-X call is ART's clean prediction, not a pass
    v = torch.from_numpy(np.asarray(attack.noise)[0]).float()
    return {"seconds": t["seconds"], "passes": passes["n"], "fooling_rate": float(attack.fooling_rate), "v": v}


def run_foolbox_loop(model, x, args) -> dict[str, Any]:
    """Algorithm 1 with Foolbox's DeepFool as the inner step, one image at a time."""
    import foolbox as fb

    fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0))
    attack = fb.attacks.L2DeepFoolAttack(steps=STEPS, candidates=CANDIDATES, overshoot=OVERSHOOT)
    with torch.no_grad():
        clean = model(x).argmax(1)
    v = torch.zeros_like(x[0])
    rate, passes = 0.0, 0
    with timer() as t:
        while rate <= 1 - args.delta and passes < args.max_passes:
            passes += 1
            for i in visiting_order(len(x), args.seed, passes).tolist():
                xi = (x[i] + v).clamp(0, 1)[None]
                with torch.no_grad():
                    if model(xi).argmax(1).item() != clean[i].item():
                        continue
                _, adv, success = attack(fmodel, xi, fb.criteria.Misclassification(clean[i:i + 1]), epsilons=None)
                if bool(success[0]):
                    v = project_lp(v + (adv[0] - xi[0]), args.eps, args.norm)
            with torch.no_grad():
                rate = (model((x + v).clamp(0, 1)).argmax(1) != clean).float().mean().item()
    return {"seconds": t["seconds"], "passes": passes, "fooling_rate": rate, "v": v}


def main(argv: list[str] | None = None) -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--n-images", type=int, default=200)
    ap.add_argument("--n-heldout", type=int, default=2000)
    ap.add_argument("--eps", type=parse_eps, default=parse_eps("10/255"))
    ap.add_argument("--norm", type=parse_norm, default=math.inf)
    ap.add_argument("--delta", type=float, default=0.2)
    ap.add_argument("--max-passes", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma-separated contenders to skip: art,foolbox,batched,bf16,unfolded")
    args = ap.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    model = setup(args)
    x, _ = load_images(args, "train", args.n_images, model)
    hx, _ = load_images(args, "test", args.n_heldout, model)

    methods = ["deepfool"] + ([] if "batched" in skip else ["deepfool-batched"])
    contenders = [(f"uap {m}", functools.partial(run_uap, model, x, args, m)) for m in methods]
    if "bf16" not in skip:
        contenders += [(f"uap {m} bf16", functools.partial(run_uap, model, x, args, m, "bf16")) for m in methods]
    if "unfolded" not in skip:
        contenders += [(f"uap {m} unfolded", functools.partial(run_uap, model, x, args, m, fold=False)) for m in methods]
    if "foolbox" not in skip:
        contenders.append(("Foolbox loop", lambda: run_foolbox_loop(model, x, args)))
    if "art" not in skip:
        contenders.append(("ART", lambda: run_art(model, x, args)))

    # PyTorch sets up its CPU kernels (oneDNN primitives) on first use of each shape: pay that
    # once, untimed, so that it is not billed to whichever contender happens to run first.
    for fold in (True, False):
        craft(model, x[:10], eps=args.eps, norm=args.norm, max_passes=1, method="deepfool", seed=args.seed,
              fold_batchnorm=fold)
    fooling_rate(model, x, torch.zeros_like(x[0]))  # … and for whole-X passes (clean predictions, Err(X_v))

    results: dict[str, dict[str, Any]] = {}
    for name, run in contenders:
        print(f"running {name} …", flush=True)
        r = run()
        v = r.pop("v")
        r["heldout_fooling_rate"] = fooling_rate(model, hx, v)
        r["norm_p"] = lp_norm(v, args.norm).item()
        results[name] = r
        print(f"  {name}: {r['seconds']:.1f} s, {r['passes']} passes, held-out fooling {r['heldout_fooling_rate']:.3f}",
              flush=True)
    base = results["uap deepfool"]["seconds"]
    art = results.get("ART", {}).get("seconds")
    for r in results.values():
        r["time_vs_uap_deepfool"] = r["seconds"] / base
        r["art_speedup"] = None if art is None else art / r["seconds"]  # ART's time ÷ this contender's
    print_table(
        f"Algorithm 1 on {args.model}: {args.n_images} crafting images, ε={args.eps:.4g}, p={args.norm}, "
        f"δ={args.delta}, ≤{args.max_passes} passes, held-out {args.n_heldout}",
        ["contender", "seconds", "× uap deepfool", "ART ÷ this", "passes", "fooling (X)", "fooling (held-out)", "‖v‖p"],
        [[k, r["seconds"], r["time_vs_uap_deepfool"], r["art_speedup"], r["passes"], r["fooling_rate"],
          r["heldout_fooling_rate"], r["norm_p"]] for k, r in results.items()],
    )
    write_results("uap", args, results)


if __name__ == "__main__":
    main()
