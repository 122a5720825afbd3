"""``uap sweep``: budget curves, held-out fooling rate against |X|, ε and passes (:func:`uap.sweep.sweep`)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from cli import command
from cli import options as o
from cli.console import console, literal, pct
from cli.craft import check_stop_rule

__all__ = ["sweep_cmd"]


@command("sweep")
def sweep_cmd(
    model: str = typer.Option("supervised", "--model", help="The target, as for `uap craft --model`. " + o.FACTORY_HELP),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Weights for the model, as for `uap craft`."),
    mean: Optional[str] = o.mean_option(),
    std: Optional[str] = o.std_option(),
    data: str = o.data_option(),
    data_root: Optional[Path] = o.data_root_option(),
    methods: str = typer.Option("deepfool,deepfool-batched,sgd,feature", "--methods", help="Crafting methods, comma-separated."),
    n_images: str = typer.Option("100,300,1000,3000,10000", "--n-images", help="The |X| axis (nested random subsets)."),
    eps: str = typer.Option("2/255,4/255,6/255,8/255,10/255,12/255", "--eps", help="The ε axis."),
    n_limit: List[str] = typer.Option([], "--n-limit", help="METHOD=N: the largest |X| for a slow method "
                                      "(its |X| curve stops there), repeatable, e.g. --n-limit deepfool=1000."),
    n_base: int = typer.Option(1000, "--n-base", min=1, help="|X| of the ε and passes axes."),
    eps_base: str = typer.Option("10/255", "--eps-base", help="ε of the |X| and passes axes."),
    norm: str = typer.Option("inf", "--norm", help="p of the ball: inf, 2 or 1."),
    passes: int = typer.Option(5, "--passes", min=1, help="Passes per run (the passes axis is the base run's history)."),
    delta: float = typer.Option(0.2, "--delta", help="Stop a run once its fooling rate on X exceeds 1 − δ."),
    heldout: int = typer.Option(2000, "--heldout", min=1, help="Held-out test images every point is measured on."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the image subsets and the visiting orders."),
    device: str = o.device_option(),
    threads: Optional[int] = o.threads_option(),
    out: Path = typer.Option(Path("runs/sweep"), "--out", help="Sweep folder: points/ (one resumable run each), "
                             "sweep.json, sweep.csv, sweep.png."),
) -> None:
    """Budget curves: held-out fooling rate vs |X|, ε and passes, per method, with the strongest baseline.

    Example: uap sweep --model supervised --methods sgd,deepfool-batched --n-images 100,1000 --eps 4/255,10/255 --out runs/sweep
    """
    from uap.atomic import check_output_folder
    from uap.inputs import load_inputs
    from uap.methods import make_method
    from uap.sweep import sweep

    p = o.parse_norm(norm)
    eps_values = [o.parse_eps(e) for e in eps.split(",") if e.strip()]
    eps_base_value = o.parse_eps(eps_base)
    for e in eps_values + [eps_base_value]:
        o.check_budget(e, p)
    counts = o.int_list(n_images, "--n-images")
    limits = o.key_values(n_limit, "--n-limit", "METHOD=N", value=lambda text: o.int_list(text, "--n-limit")[0])
    method_names = [m.strip() for m in methods.split(",") if m.strip()]
    for m in method_names:  # an unknown method fails before anything loads
        make_method(m)
    check_stop_rule(delta, passes)
    mean_v, std_v = o.normalisation(mean, std)
    torch_device = o.torch_device(device)
    o.use_threads(threads)
    check_output_folder(out, "--out")
    target, model_id = o.resolve_target(model, "--model", weights, mean_v, std_v)
    target = target.to(torch_device)
    inputs = load_inputs({model_id: target}, data, n_train=max(counts + [n_base]), n_test=heldout, seed=seed, root=data_root,
                         stream_test=False)

    def on_point(event: dict) -> None:
        s, point = event["summary"], event["point"]
        console.print(f"[{event['index']}/{event['total']}] {literal(point.method)} |X|={point.n_images} "
                      f"ε={point.eps:.4g}: held-out fooling {pct(s['heldout_fooling_rate'])} "
                      f"(baseline {literal(s['baseline']['name'])} {pct(s['baseline']['heldout_fooling_rate'])}), "
                      f"{s['seconds']:.1f} s")

    result = sweep(target, inputs.x, inputs.heldout, out, methods=method_names, n_images=counts, eps=eps_values,
                   n_base=n_base, eps_base=eps_base_value, norm=p, passes=passes, delta=delta, seed=seed,
                   model_id=model_id, data=f"{data}:train:seed={seed}", n_limits=limits,
                   settings={"command": "sweep", **({"mean": mean_v, "std": std_v} if mean_v else {})},
                   callback=on_point)
    written = result.save(out)
    for method, axes in result.crossings.items():
        text = ", ".join(f"{axis} ≥ {value:.4g}" if value is not None else f"{axis}: never" for axis, value in axes.items())
        console.print(f"{literal(method)} reaches the strongest baseline at: {text}")
    console.print(f"wrote {literal(written['json'])}, {written['csv'].name}, {written['png'].name}")
