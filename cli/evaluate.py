"""``uap evaluate``: saved perturbations on several models, with baseline rows (:func:`uap.evaluate`)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

import uap
from cli import command
from cli import options as o
from cli.console import console, literal
from cli.show import report_table

__all__ = ["evaluate_cmd"]


@command("evaluate")
def evaluate_cmd(
    perturbations: List[Path] = typer.Argument(None, help="Saved perturbations: the .safetensors/.json pair, its stem, "
                                               "or the run folder `uap craft` wrote. None: baseline rows only (give --eps)."),
    models: str = o.models_option(),
    data: str = o.data_option(),
    split: str = typer.Option("test", "--split", help="Split the held-out images come from."),
    n_images: int = typer.Option(2000, "--n-images", min=1, help="Held-out images (class-balanced subset)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the image subset."),
    batch_size: int = typer.Option(uap.forward.DEFAULT_BATCH_SIZE, "--batch-size", min=1, help="Images per forward pass."),
    out: Path = typer.Option(Path("runs/eval"), "--out", help="Folder for results.json, results.csv and figures."),
    data_root: Optional[Path] = o.data_root_option(),
    image_size: Optional[int] = o.image_size_option(),
    resize: Optional[int] = o.resize_option(),
    device: str = o.device_option(),
    baselines: str = o.baselines_option("data-free", "Their budget: --eps/--norm if given, else "
                                        "the largest norm of the perturbations (in the norm they were crafted in)."),
    eps: Optional[str] = typer.Option(None, "--eps", help="Budget ε of the baseline rows (default: the perturbations')."),
    norm: Optional[str] = typer.Option(None, "--norm", help="Norm of the baseline rows' budget: inf, 2 or 1 (default: "
                                       "the perturbations', ∞ without any)."),
    n_craft: int = typer.Option(1000, "--n-craft", min=1, help="Images of the train split of --data that searched "
                                "baselines (fourier) are searched on (never the held-out --split images)."),
    probe_data: Optional[str] = o.probe_data_option(),
    probe_images: int = o.probe_images_option(),
    threads: Optional[int] = o.threads_option(),
) -> None:
    """Evaluate perturbations on several models: fooling rate, accuracies, dominant label, embedding cosine.

    Example: uap evaluate runs/sup-linf8 --models supervised,supervised@knn --n-images 2000 --out runs/eval
    """
    from uap.atomic import check_output_folder
    from uap.baselines import needs_of, parse_baselines
    from uap.evaluate import baselines_at_budget, evaluate
    from uap.saved import load_perturbations
    from uap.inputs import load_inputs

    o.use_threads(threads)
    check_output_folder(out, "--out")
    chosen = o.flagged("--baselines", parse_baselines, baselines)
    budget = {"eps": None if eps is None else o.parse_eps(eps), "norm": None if norm is None else o.parse_norm(norm)}
    if budget["eps"] is not None:
        o.check_budget(budget["eps"], budget["norm"] if budget["norm"] is not None else float("inf"))
    loaded_perts = load_perturbations(perturbations) if perturbations else {}
    loaded, _ = o.load_models(models, device, crafted=loaded_perts, log=lambda line: console.print(f"[dim]{literal(line)}[/]"))
    inputs = load_inputs(loaded, data, n_train=n_craft if "x_craft" in needs_of(chosen) else 0,
                         n_test=n_images, seed=seed, root=data_root, image_size=image_size, resize=resize,
                         test_split=split, probe_data=probe_data, probe_images=probe_images,
                         log=lambda line: console.print(f"[dim]{literal(line)}[/]"))
    x, y = inputs.heldout
    meta = {"command": "evaluate", "data": data, "split": split, "n_images": n_images, "seed": seed,
            "files": [str(p) for p in perturbations or []], "preprocessing": inputs.settings()}
    with console.status("evaluating") as status:
        rows = baselines_at_budget(chosen, x.shape[1:], loaded_perts, **budget, models=loaded, x_craft=inputs.x,
                                   seed=seed, batch_size=batch_size,
                                   callback=lambda _e, info: status.update(f"{literal(info.get('baseline', ''))} search "
                                                                           f"on {literal(info.get('model', ''))}"))
        report = evaluate(loaded_perts, loaded, x, y, batch_size=batch_size, classes=inputs.classes, meta=meta,
                          baselines=rows, progress=lambda done, total, desc: status.update(literal(desc)))
    console.print(report_table(report, "fooling rate (%)", f"{report.n_images} {literal(data)} {literal(split)} images; "
                               "fooling = prediction differs from the model's clean prediction; below: accuracy "
                               "under v, share of the most common perturbed label"))
    perts = {**{k: p.v for k, p in loaded_perts.items()}, **rows.perturbations}
    written = report.save(out, perts, loaded, x, y)
    if written:
        console.print(f"wrote {literal(out)}/{', '.join(literal(p.name) for p in written)}")
