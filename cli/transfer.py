"""``uap transfer``: the cross-model transfer matrix (:func:`uap.transfer_matrix`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

import uap
from cli import command
from cli import options as o
from cli.console import console, literal
from cli.craft import check_stop_rule
from cli.show import report_table, transfer_progress

__all__ = ["transfer_cmd"]


@command("transfer")
def transfer_cmd(
    models: str = o.models_option(),
    eps: str = typer.Option("8/255", "--eps", help="Budget ε, e.g. 8/255 or 10."),
    norm: str = typer.Option("inf", "--norm", help="inf, 2 or 1."),
    delta: float = typer.Option(0.2, "--delta", help="Stop when the crafting-set fooling rate reaches 1 − δ."),
    max_passes: int = typer.Option(10, "--max-passes", help="Maximum passes over the crafting images."),
    method: str = typer.Option("deepfool", "--method", help="UAP crafting method (see `uap craft --help`)."),
    data: str = o.data_option(),
    n_craft: int = typer.Option(1000, "--n-craft", min=1, help="Crafting images (train split), shared by all source models."),
    n_images: int = typer.Option(1000, "--n-images", min=1, help="Held-out evaluation images (test split)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the image subsets, the crafting and the random baseline."),
    batch_size: int = typer.Option(uap.forward.DEFAULT_BATCH_SIZE, "--batch-size", min=1, help="Images per forward pass when evaluating."),
    out: Path = typer.Option(Path("runs/transfer"), "--out", help="Folder for results, figures and crafted perturbations (reused on re-run)."),
    data_root: Optional[Path] = o.data_root_option(),
    image_size: Optional[int] = o.image_size_option(),
    resize: Optional[int] = o.resize_option(),
    device: str = o.device_option(),
    baselines: str = o.baselines_option("data-free", "Their norm: the largest of the crafted "
                                        "UAPs'; baselines that search per model search on the crafting images."),
    probe_data: Optional[str] = o.probe_data_option(),
    probe_images: int = o.probe_images_option(),
    threads: Optional[int] = o.threads_option(),
    sources: Optional[str] = typer.Option(None, "--sources", help="Comma-separated models to craft on (rows; "
                                          "default: every model of --models)."),
    ensemble: bool = typer.Option(False, "--ensemble", help="Add a row whose cell in each column is a UAP crafted "
                                  "against every source but that column (black-box transfer from an ensemble)."),
) -> None:
    """Cross-model transfer matrix: one UAP per model, each applied to every model, plus baseline rows.

    Example: uap transfer --models all --eps 8/255 --norm inf --n-craft 1000 --n-images 1000 --out runs/transfer
    """
    from uap.atomic import check_output_folder
    from uap.baselines import parse_baselines
    from uap.inputs import load_inputs
    from uap.methods import make_method
    from uap.projection import norm_name

    eps_value, p = o.parse_eps(eps), o.parse_norm(norm)
    o.check_budget(eps_value, p)
    check_stop_rule(delta, max_passes)
    make_method(method)
    o.use_threads(threads)
    check_output_folder(out, "--out")
    chosen = o.flagged("--baselines", parse_baselines, baselines)
    loaded, specs = o.load_models(models, device)
    inputs = load_inputs(loaded, data, n_train=n_craft, n_test=n_images, seed=seed, root=data_root,
                         image_size=image_size, resize=resize, probe_data=probe_data, probe_images=probe_images,
                         log=lambda line: console.print(f"[dim]{literal(line)}[/]"))
    x_eval, y_eval = inputs.heldout
    bar, on_event = transfer_progress(max_passes, len(loaded))
    with bar:
        result = uap.transfer_matrix(loaded, inputs.x, x_eval, y_eval, eps=eps_value, norm=p, delta=delta,
                                     max_passes=max_passes, method=method, seed=seed, out_dir=out,
                                     model_ids=dict(zip(loaded, specs)), batch_size=batch_size, classes=inputs.classes,
                                     baselines=chosen, callback=on_event, ensemble=ensemble,
                                     sources=_sources(sources, list(loaded), specs))
    result.report.meta.update(command="transfer", data=data, n_images=n_images, n_craft=n_craft,
                              preprocessing=inputs.settings())
    caption = (f"rows: crafted on ({n_craft} {literal(data)} train images), columns: applied to "
               f"({result.report.n_images} held-out test images); ε={literal(eps)}, ℓ{norm_name(p)}; "
               "baselines: same norm, no crafting (NAME:M searched on M's crafting-set fooling rate)")
    console.print(report_table(result.report, "transfer: fooling rate (%)", caption))
    written = result.report.save(out, result.perturbations, loaded, x_eval, y_eval)
    if written:
        console.print(f"wrote {literal(out)}/{', '.join(literal(p.name) for p in written)}")


def _sources(text: str | None, names: list[str], specs: list[str]) -> list[str] | None:
    """The ``--sources`` as model names (each given by its name or by its spec in ``--models``)."""
    if text is None:
        return None
    by_spec = dict(zip(specs, names))
    chosen = [by_spec.get(s.strip(), s.strip()) for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in names]
    if unknown:
        raise o.UsageError(f"--sources {', '.join(unknown)} not among --models ({', '.join(names)})")
    return chosen
