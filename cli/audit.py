"""``uap audit``: every model's worst case over a fixed, versioned set of universal attacks (:func:`uap.audit`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

import uap
from cli import command
from cli import options as o
from cli.console import console, literal, pct

__all__ = ["audit_cmd"]


@command("audit")
def audit_cmd(
    models: str = o.models_option(),
    eps: str = typer.Option("10/255", "--eps", help="Budget ε of every attack and baseline, e.g. 10/255."),
    norm: str = typer.Option("inf", "--norm", help="inf, 2 or 1."),
    quick: bool = typer.Option(False, "--quick", help="The cheaper protocol (fewer passes, no Fourier search): "
                               "a lower bound on the standard audit's worst case."),
    data: str = o.data_option(),
    n_craft: int = typer.Option(1000, "--n-craft", min=1, help="Crafting images (train split) every attack uses."),
    n_images: int = typer.Option(2000, "--n-images", min=1, help="Held-out images (test split) every row is measured on."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the image subsets, the crafting and the random baselines."),
    batch_size: int = typer.Option(uap.forward.DEFAULT_BATCH_SIZE, "--batch-size", min=1, help="Images per forward pass when evaluating."),
    out: Path = typer.Option(Path("runs/audit"), "--out", help="Folder for audit.json/csv/png and every attack's run (reused on re-run)."),
    data_root: Optional[Path] = o.data_root_option(),
    image_size: Optional[int] = o.image_size_option(),
    resize: Optional[int] = o.resize_option(),
    device: str = o.device_option(),
    probe_data: Optional[str] = o.probe_data_option(),
    probe_images: int = o.probe_images_option(),
    threads: Optional[int] = o.threads_option(),
) -> None:
    """Universal-robustness audit: each model's held-out fooling rate under every attack of a fixed protocol, and the worst case.

    Example: uap audit --models supervised,simclr --eps 10/255 --quick --n-craft 1000 --n-images 2000 --out runs/audit
    """
    from uap.atomic import check_output_folder
    from uap.audit import PROTOCOLS, audit
    from uap.inputs import load_inputs

    eps_value, p = o.parse_eps(eps), o.parse_norm(norm)
    o.check_budget(eps_value, p)
    o.use_threads(threads)
    check_output_folder(out, "--out")
    protocol = PROTOCOLS["quick" if quick else "standard"]
    loaded, specs = o.load_models(models, device)
    inputs = load_inputs(loaded, data, n_train=n_craft, n_test=n_images, seed=seed, root=data_root,
                         image_size=image_size, resize=resize, probe_data=probe_data, probe_images=probe_images,
                         log=lambda line: console.print(f"[dim]{literal(line)}[/]"))
    x_eval, y_eval = inputs.heldout

    def on_event(event: str, info: dict) -> None:
        if event == "craft":
            console.print(f"[dim]{literal(info['model'])}: {literal(info['attack'])} "
                          f"({info['index'] + 1}/{info['total']})[/]")
        elif event == "craft_step" and info.get("event") == "pass":
            console.print(f"[dim]  pass {info['pass']}: fooling {pct(info['fooling_rate'])} on the crafting images[/]")

    result = audit(loaded, inputs.x, x_eval, y_eval, eps=eps_value, norm=p, protocol=protocol, seed=seed, out_dir=out,
                   model_ids=dict(zip(loaded, specs)), batch_size=batch_size, classes=inputs.classes, callback=on_event)
    result.meta.update(data=data, preprocessing=inputs.settings())
    for model in result.reports:
        console.print(_table(result, model))
    written = result.save(out)
    console.print(f"wrote {literal(out)}/{', '.join(literal(w.name) for w in written)}")


def _table(result, model: str) -> Table:
    worst = result.worst(model)
    table = Table(title=f"uap audit ({result.protocol['name']} v{result.protocol['version']}) · {literal(model)}",
                  title_style="bold", caption=f"held-out fooling rate [95 % interval] and accuracy under v; "
                  f"ℓ{result.meta['norm']} ε={result.meta['eps']:.4g}, {result.meta['n_eval']} held-out images")
    for name, justify in (("attack", "left"), ("kind", "left"), ("fooling rate", "right"), ("accuracy under v", "right")):
        table.add_column(name, justify=justify)
    for r in sorted(result.rows(model), key=lambda r: -r["fooling_rate"]):
        style = "bold" if r["attack"] == worst["fooling_attack"] else ""
        table.add_row(literal(r["attack"]), r["kind"], f"{pct(r['fooling_rate'])} [dim][{_num(r['fooling_rate_low'])}, "
                      f"{_num(r['fooling_rate_high'])}][/]", pct(r["accuracy"]), style=style)
    table.add_section()
    table.add_row("[bold]worst case[/]", "", f"[bold]{pct(worst['fooling_rate'])}[/] ({literal(worst['fooling_attack'])})",
                  f"[bold]{pct(worst['accuracy'])}[/] ({literal(str(worst['accuracy_attack']))}); clean {pct(worst['clean_accuracy'])}")
    return table


def _num(rate: float) -> str:
    return "–" if rate != rate else f"{100 * rate:.1f}"
