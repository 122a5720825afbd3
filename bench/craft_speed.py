"""SGD-UAP crafting against the bare loop it runs: what the driver's bookkeeping costs.

Two contenders, run alternately (bare, craft, bare, craft …) on the same images, the same
model and the same number of threads, and compared by their medians:

- ``bare``: the SGD-UAP loop written plainly (what a researcher would type): the clean labels
  k̂(x) in one no-grad pass, then per pass and per minibatch of 32 in the pass's visiting order
  the forward of ``clip(x + v)``, the clamped cross-entropy to k̂(x), the backward to ``v``, the
  sign step ``α_k · sign(g)`` and the clamp to ``[−ε, ε]``. It attacks the same batch-norm-folded
  copy of the model that :func:`uap.craft` attacks (:func:`uap.fold_batchnorm`), so the
  comparison is about the driver, not about folding.
- ``craft``: :func:`uap.craft` with ``method="sgd"`` and the same options, held-out images
  given, as ``uap craft --method sgd`` runs it (clean-prediction cache cleared each time).

Two settings:

- ``every``: ``eval_every=1`` (the default): after the pass, Err(X_v) on the crafting set and
  the held-out rates are measured.
- ``schedule``: ``delta=0``, ``max_passes=P`` and ``eval_every=P``: only the last pass is
  measured; seconds are per pass (the run's time / P).

A third setting, ``deepfool``, times one :func:`uap.deepfool` call (ℓ2, 10 candidates, 50
steps, overshoot 0.02: Algorithm 1's inner step) on the first ``--deepfool-images`` crafting
images with each way of computing the candidates' gradients (``gradients=``), per image.

The ``max |Δv|`` column checks that both contenders computed the same perturbation (the
driver differentiates a minibatch of 32 224² images in parts, so float rounding may differ).

Run::

    UAP_DATA_DIR=/path/to/data python -m bench.craft_speed --threads 2
"""
from __future__ import annotations

import math
import os
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import base_parser, console, parse_eps, print_table, write_results
from uap import craft, deepfool, fold_batchnorm
from uap.inputs import load_inputs
from uap.metrics import DEFAULT_CACHE
from uap.targets import resolve_model
from uap.universal import visiting_order

BETA, STEP_SIZE, DECAY = 10.0, 0.1, 0.7  # SGD-UAP's defaults (uap.methods.sgd)


def bare_loop(model: torch.nn.Module, x: torch.Tensor, *, eps: float, passes: int, batch_size: int,
              seed: int) -> tuple[torch.Tensor, float]:
    """The plain SGD-UAP loop (module docstring); returns ``v`` and the seconds its clean labels took."""
    t0 = time.perf_counter()
    with torch.no_grad():
        clean = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    labels_seconds = time.perf_counter() - t0
    v = torch.zeros(x.shape[1:])
    for k in range(1, passes + 1):
        step = STEP_SIZE * eps * DECAY ** (k - 1)
        for idx in visiting_order(len(x), seed, k).split(batch_size):
            v.requires_grad_(True)
            loss = F.cross_entropy(model((x[idx] + v).clamp(0, 1)), clean[idx], reduction="none").clamp(max=BETA).mean()
            (g,) = torch.autograd.grad(loss, v)
            v = (v.detach() + step * g.sign()).clamp(-eps, eps)
    return v.detach(), labels_seconds


def deepfool_costs(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> dict[str, Any]:
    """Seconds per image of one :func:`uap.deepfool` call on ``x`` for each gradient mode,
    alternating the modes ``repeats`` times (medians), with the success rate and median ‖r‖₂."""
    modes = ("loop", "replicated", "batched")
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    out: dict[str, Any] = {}
    for _ in range(repeats):
        for mode in modes:
            t0 = time.perf_counter()
            r, ok = deepfool(model, x, norm=2, candidates=10, overshoot=0.02, max_iter=50, gradients=mode)
            seconds[mode].append((time.perf_counter() - t0) / len(x))
            out[mode] = {"success": ok.float().mean().item(),
                         "median_r2": r.flatten(1).norm(dim=1).median().item()}
            console.print(f"deepfool {mode}: {seconds[mode][-1]:.2f} s/image")
    return {m: {**out[m], "seconds_per_image": statistics.median(seconds[m]), "all": seconds[m]} for m in modes}


def main(argv: list[str] | None = None) -> None:
    ap = base_parser(__doc__.splitlines()[0])
    sample = os.path.join(os.environ.get("UAP_DATA_DIR", "data"), "imagenet-sample", "val")
    ap.set_defaults(model="timm:tf_efficientnet_lite0", data=f"imagefolder:{sample}")
    ap.add_argument("--n-images", type=int, default=256, help="crafting images (the sample has about 805)")
    ap.add_argument("--heldout", type=int, default=195)
    ap.add_argument("--eps", type=parse_eps, default=parse_eps("10/255"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="alternations per setting")
    ap.add_argument("--passes", type=int, default=4, help="passes P of the 'schedule' setting")
    ap.add_argument("--settings", default="every,schedule", help="comma-separated: every, schedule, deepfool")
    ap.add_argument("--deepfool-images", type=int, default=4)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model, model_id = resolve_model(args.model)
    model.eval()
    inputs = load_inputs({model_id: model}, args.data, n_train=args.n_images, n_test=args.heldout, seed=args.seed,
                         root=args.data_root, stream_test=False, log=console.print)

    def tensor(images: Any) -> torch.Tensor:
        return images if torch.is_tensor(images) else images[torch.arange(len(images))]

    x, heldout = tensor(inputs.x), (tensor(inputs.heldout[0]), inputs.heldout[1])
    folded = fold_batchnorm(model, x[:4])
    console.print(f"{model_id}: {len(x)} crafting and {len(heldout[0])} held-out images at "
                  f"{tuple(x.shape[1:])}, {torch.get_num_threads()} threads")

    results: dict[str, Any] = {}
    rows = []
    for setting in args.settings.split(","):
        if setting == "deepfool":
            results["deepfool"] = deepfool_costs(folded, x[:args.deepfool_images], args.repeats)
            continue
        passes, eval_every = (1, 1) if setting == "every" else (args.passes, args.passes)
        bare_s, craft_s, labels_s, diffs = [], [], [], []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            v_bare, labels = bare_loop(folded, x, eps=args.eps, passes=passes, batch_size=args.batch_size, seed=args.seed)
            bare_s.append((time.perf_counter() - t0) / passes)
            labels_s.append(labels)
            DEFAULT_CACHE.clear()  # craft pays for its clean predictions, as the bare loop does
            t0 = time.perf_counter()
            pert = craft(model, x, eps=args.eps, norm=math.inf, delta=0.0, max_passes=passes, method="sgd",
                         seed=args.seed, heldout=heldout, eval_every=eval_every,
                         method_options={"batch_size": args.batch_size})
            craft_s.append((time.perf_counter() - t0) / passes)
            diffs.append((pert.v - v_bare).abs().max().item())
            console.print(f"{setting} #{r + 1}: bare {bare_s[-1]:.2f} s/pass, craft {craft_s[-1]:.2f} s/pass")
        bare, crafted = statistics.median(bare_s), statistics.median(craft_s)
        results[setting] = {"passes": passes, "eval_every": eval_every, "bare_seconds_per_pass": bare_s,
                            "craft_seconds_per_pass": craft_s, "bare_label_seconds": labels_s,
                            "ratio": crafted / bare, "max_abs_v_difference": max(diffs),
                            "fooling_rate": pert.fooling_rate, "heldout_fooling_rate": pert.heldout_fooling_rate}
        rows.append([setting, passes, eval_every, bare, statistics.median(labels_s) / passes, crafted,
                     crafted / bare, max(diffs)])
    if "deepfool" in results:
        print_table(f"uap.deepfool on {model_id} (BN folded), {args.deepfool_images} images in one call, "
                    f"seconds per image (medians of {args.repeats})", ["gradients", "s/image", "fooled", "median ‖r‖₂"],
                    [[mode, r["seconds_per_image"], r["success"], r["median_r2"]] for mode, r in results["deepfool"].items()])
    if not rows:
        write_results("craft_speed", args, results)
        return
    print_table(f"SGD-UAP on {model_id}: bare loop vs uap.craft, seconds per pass (medians of {args.repeats})",
                ["setting", "passes", "eval_every", "bare s/pass", "of which labels", "craft s/pass",
                 "ratio", "max |Δv|"], rows)
    write_results("craft_speed", args, results)


if __name__ == "__main__":
    main()
