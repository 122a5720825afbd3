"""Why Algorithm 1 is weak under an ℓ∞ budget: measure every update of one pass.

For each DeepFool call inside Algorithm 1 the diagnosis records the step ``Δv_i`` (its ℓ2 and
ℓ∞ norm against ε) and, for each accepted update ``v ← P(v + Δv_i)``:

- ``removed``: the share of the step the projection takes away, ``‖(v+Δv_i) − P(v+Δv_i)‖₂ / ‖Δv_i‖₂``;
- ``kept``: whether ``x_i`` is fooled at the ``v`` the update produced (after the projection,
  and any refinement: the update did what it was for);
- ``gain``: the change of Err(X_v) on the crafting images, sampled every ``--every`` updates.

It runs the paper's setting and the variants that bear on those numbers (an ℓ∞ DeepFool step,
a larger overshoot, re-running DeepFool at the projected point, a smaller step), each for the same images,
seed and budget, and prints one table; ``--out`` keeps the JSON.

    python -m bench.algorithm1_diagnosis --model supervised --n-images 500 --eps 10/255 --passes 1
"""
from __future__ import annotations

import statistics
from typing import Any

import torch

from bench.common import base_parser, load_images, parse_eps, print_table, setup, write_results
from uap import craft, fooling_rate
from uap.methods import make_method
from uap.methods.algorithm1 import algorithm1_pass
from uap.methods.deepfool import DeepFool, DeepFoolStep

VARIANTS: dict[str, dict[str, Any]] = {
    "paper (ℓ2 DeepFool, overshoot 0.02)": {},
    "ℓ∞ DeepFool step": {"method_options": {"norm": "inf"}},
    "overshoot 0.5": {"method_options": {"overshoot": 0.5}},
    "refine 3 (DeepFool again at P(v+Δv))": {"method_options": {"refine": 3}},
    "step size 0.25": {"method_options": {"step_size": 0.25}},
    "step size 0.25, overshoot 0.5": {"method_options": {"step_size": 0.25, "overshoot": 0.5}},
}


class _Recorder:
    """Collects the per-update facts of one run."""

    def __init__(self, x: torch.Tensor, every: int) -> None:
        self.x, self.every = x, every
        self.steps: list[dict[str, float]] = []
        self.updates: list[dict[str, float]] = []
        self.err: list[tuple[int, float]] = []


class _InstrumentedStep(DeepFoolStep):
    """DeepFool that records its steps; an update's outcome (is ``x_i`` fooled at the ``v`` it
    produced, after any refinement?) is read at the next call of the pass, or at its end."""

    def __init__(self, ctx, recorder: _Recorder, settings: dict[str, Any]) -> None:
        super().__init__(ctx, settings)
        self.rec, self.last_r, self.pending = recorder, None, None
        self.ctx = ctx

    def settle(self) -> None:
        if self.pending is not None:
            i, record = self.pending
            record["kept"] = float(self.ctx.is_fooled(i)[0])  # at the current v
            self.pending = None
            if len(self.rec.updates) % self.rec.every == 0:
                every = torch.arange(len(self.rec.x))
                self.rec.err.append((len(self.rec.updates), float(self.ctx.is_fooled(every).float().mean())))

    def __call__(self, ctx, idx, logits, lookahead):
        refining = ctx is not self.ctx  # a refinement step, from the projected point
        if not refining:
            self.settle()
        res = super().__call__(ctx, idx, logits, lookahead)
        if not refining:
            for r in res.r:
                self.rec.steps.append({"l2": float(r.norm()), "linf": float(r.abs().max())})
            self.last_r = res.r[0]
        return res

    def accept(self, ctx, i, candidate, logits_at_v, logits_at_candidate) -> bool:
        ok = super().accept(ctx, i, candidate, logits_at_v, logits_at_candidate)
        if ok and self.last_r is not None:
            alpha = ctx.options.step_size
            raw = ctx.v + alpha * self.last_r
            record = {"removed": float((raw - candidate).norm() / (alpha * self.last_r).norm().clamp_min(1e-12))}
            self.rec.updates.append(record)
            self.pending = (i, record)
        return ok


def _instrumented(recorder: _Recorder, options: dict[str, Any]):
    class Instrumented(DeepFool):
        name = "deepfool"

        def run_pass(self, ctx) -> None:
            step = _InstrumentedStep(ctx, recorder, self.options.deepfool())
            algorithm1_pass(ctx, step, self.options)
            step.settle()

    return Instrumented(options)


def run(model, x, hx, eps: float, passes: int, every: int, variant: dict[str, Any]) -> dict[str, Any]:
    rec = _Recorder(x, every)
    options = variant.get("method_options", {})
    make_method("deepfool", options)  # the variant's options are real options of the method
    pert = craft(model, x, eps=eps, norm="inf", delta=0.01, max_passes=passes, seed=0,
                 method=_instrumented(rec, options))
    ups = rec.updates
    gains = [b - a for (_, a), (_, b) in zip(rec.err, rec.err[1:])]
    return {
        "fooling_rate": pert.fooling_rate, "heldout_fooling_rate": fooling_rate(model, hx, pert.v),
        "calls": len(rec.steps), "updates": len(ups),
        "step_l2_median": statistics.median(s["l2"] for s in rec.steps) if rec.steps else None,
        "step_linf_over_eps_median": statistics.median(s["linf"] / eps for s in rec.steps) if rec.steps else None,
        "removed_median": statistics.median(u["removed"] for u in ups) if ups else None,
        "kept_share": sum(u["kept"] for u in ups) / len(ups) if ups else None,
        "refine_calls": pert.history[-1]["deepfool_calls"] - len(rec.steps) if passes == 1 else None,
        "err_trace": rec.err, "err_gain_per_update": (statistics.mean(gains) / every) if gains else None,
        "seconds": pert.seconds,
    }


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--n-images", type=int, default=500)
    ap.add_argument("--n-heldout", type=int, default=2000)
    ap.add_argument("--eps", type=parse_eps, default=parse_eps("10/255"))
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--every", type=int, default=25, help="sample Err(X_v) every this many updates")
    ap.add_argument("--variants", default="all", help="comma-separated variant numbers (0 = paper) or all")
    args = ap.parse_args()
    model = setup(args)
    x, _ = load_images(args, "train", args.n_images)
    hx, _ = load_images(args, "test", args.n_heldout)
    chosen = list(VARIANTS) if args.variants == "all" else [list(VARIANTS)[int(i)] for i in args.variants.split(",")]
    results = {name: run(model, x, hx, args.eps, args.passes, args.every, VARIANTS[name]) for name in chosen}
    rows = [[name, f"{100 * r['fooling_rate']:.1f}", f"{100 * r['heldout_fooling_rate']:.1f}", r["calls"], r["updates"],
             f"{r['step_linf_over_eps_median']:.2f}", f"{r['step_l2_median']:.3f}", f"{100 * r['removed_median']:.0f} %",
             f"{100 * r['kept_share']:.0f} %", f"{100 * (r['err_gain_per_update'] or 0):+.3f}", f"{r['seconds']:.0f}"]
            for name, r in results.items()]
    print_table(f"Algorithm 1 diagnosis: ℓ∞ ε = {args.eps:.4f}, {args.n_images} images, {args.passes} pass(es)",
                ["variant", "Err(X_v) %", "held-out %", "DeepFool calls", "updates", "median ‖Δv‖∞/ε",
                 "median ‖Δv‖₂", "median share removed by P", "x_i still fooled after P", "Err gain/update (pts)",
                 "s"], rows)
    write_results("algorithm1_diagnosis", args, results)


if __name__ == "__main__":
    main()
