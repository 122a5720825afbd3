"""Tables and progress displays: how the commands show the library's results and events."""
from __future__ import annotations

from typing import Any, Callable

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.console import console, literal, pct

__all__ = ["craft_table", "report_table", "craft_progress", "transfer_progress"]


def craft_table(summary: dict) -> Table:
    """A finished crafting run (:func:`uap.runs.summarize`) as the table ``uap craft`` ends with;
    an ensemble's rates have one column per model beside their mean."""
    models = summary.get("models") or []
    table = Table(title=f"uap craft · {literal(summary['model'])} · ℓ{summary['norm']} ε={summary['eps']:.4g} · "
                  f"{literal(summary['method'])}", title_style="bold")
    table.add_column("", style="bold")
    table.add_column("mean of the models" if models else "value", justify="right")
    for name in models:
        table.add_column(literal(name), justify="right")

    def row(label: str, value: str, per_model: dict | None = None, show=pct) -> None:
        table.add_row(label, value, *[show((per_model or {}).get(name)) for name in models])

    row("fooling rate (crafting set)", pct(summary["fooling_rate"]), summary.get("fooling_rates"))
    row("fooling rate (held-out)", pct(summary["heldout_fooling_rate"]), summary.get("heldout_fooling_rates"))
    baseline = summary.get("baseline")
    if baseline:
        each = {m: f"{pct(b['heldout_fooling_rate'])} ({b['name']})" for m, b in (baseline.get("models") or {}).items()}
        row("strongest baseline (held-out)", f"{pct(baseline['heldout_fooling_rate'])}"
            + ("" if models else f" ({baseline['name']})"), each, show=lambda text: text or "–")
    if summary.get("heldout_accuracy") is not None and models:
        row("held-out accuracy under v", pct(summary["heldout_accuracy"]), summary.get("heldout_accuracies"))
    elif summary.get("heldout_accuracy") is not None:
        row("held-out accuracy clean → under v", f"{pct(summary['clean_heldout_accuracy'])} → {pct(summary['heldout_accuracy'])}")
    row("‖v‖₂ / ‖v‖∞", f"{summary['norm_2']:.4f} / {summary['norm_inf']:.4f}", show=lambda _: "")
    kept = summary.get("best_pass")
    row("passes", str(summary["passes"]) + ("" if kept is None else f" (v from pass {kept}, --keep-best)"), show=lambda _: "")
    if summary.get("init") is not None:
        row("started from", literal(summary["init"] if isinstance(summary["init"], str) else summary["init"].get("file", "a tensor")),
            show=lambda _: "")
    if summary.get("stopped"):
        row("stopped", literal(summary["stopped"]["text"]), show=lambda _: "")
    for name, count in (summary.get("counters") or {}).items():  # the method's own work counts (none done: no row)
        if count:
            row(literal(name.replace("_", " ")), str(count), show=lambda _: "")
    row("time", f"{summary['seconds']:.1f} s", show=lambda _: "")
    return table


def report_table(report, title: str, caption: str = "") -> Table:
    """A :class:`uap.report.Report` as a table: fooling rate per (perturbation, model), with
    accuracy under ``v`` and the most common perturbed label below; baselines in their own section.
    Under a thousand held-out images, each rate has its 95 % interval beside it."""
    def cell(v: float) -> str:
        return "–" if v != v else f"{100 * v:.1f}"

    def rate(i: int, j: int) -> str:
        low, high = report.interval(report.perturbations[i], report.models[j])
        if report.n_images >= 1000 or low != low:
            return cell(report.fooling_rate[i, j])
        return f"{cell(report.fooling_rate[i, j])} [dim][{cell(low)}, {cell(high)}][/]"

    table = Table(title=title, title_style="bold", caption=caption or None)
    table.add_column("perturbation \\ model", style="bold")
    for m in report.models:
        table.add_column(literal(m), justify="right")
    for i, pert in enumerate(report.perturbations):
        if report.is_baseline(pert) and (i == 0 or not report.is_baseline(report.perturbations[i - 1])):
            table.add_section()
        cells = []
        for j, m in enumerate(report.models):
            text = rate(i, j)
            text = f"[bold]{text}[/]" if pert == m else text
            label = report.dominant_label[i, j]
            if report.classes and 0 <= label < len(report.classes):
                label = report.classes[label]
            detail = f"acc {cell(report.accuracy[i, j])} · {cell(report.dominant_share[i, j])} % → {literal(label)}"
            cells.append(f"{text}\n[dim]{detail}[/]")
        table.add_row(f"[italic]{literal(pert)}[/]\n[dim]baseline[/]" if report.is_baseline(pert) else literal(pert), *cells)
    table.add_section()
    table.add_row("[dim]clean acc.[/]", *[f"[dim]{cell(a)}[/]" for a in report.clean_accuracy])
    return table


def craft_progress(out: object, n_images: int, max_passes: int) -> tuple[Progress, Callable[[dict], None]]:
    """A progress bar for one crafting run and the callback that drives it from the run's events
    (see :meth:`uap.runs.RunFolder.craft`); the bar shows once crafting starts."""
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("fooled {task.fields[fooled]}"), TimeElapsedColumn(), console=console, transient=False)
    task = progress.add_task("pass 1", total=n_images, fooled="–")

    def on_event(event: dict) -> None:
        kind = event["event"]
        if kind == "reused":
            console.print(f"[green]{literal(out)} already holds a finished run with these settings[/] (--force recrafts it)")
        elif kind == "start":
            if event["resumed_passes"]:
                console.print(f"resuming after pass {event['resumed_passes']} from {literal(event['checkpoint'])}")
            progress.start()
        elif kind == "progress":
            seen = event["visited"]
            progress.update(task, description=f"pass {event['pass']}/{max_passes}", completed=seen, total=event["total"],
                            fooled=f"{100 * event['fooled_seen'] / seen:.1f} %" if seen else "–")
        elif kind == "pass":
            held = event["heldout_fooling_rate"]
            progress.console.print(f"pass {event['pass']}: fooling rate {pct(event['fooling_rate'])}"
                                   + ("" if held is None else f", held-out {pct(held)}")
                                   + f", ‖v‖∞ {event['norm_inf']:.4f}, {event['seconds']:.1f} s")

    return progress, on_event


def transfer_progress(max_passes: int, n_sources: int) -> tuple[Progress, Callable[[str, dict], None]]:
    """Bars for a transfer matrix (sources crafted, passes of the current one, evaluation) and
    the callback that drives them from :func:`uap.transfer_matrix`'s events."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[info]}"), console=console)
    sources = bar.add_task("source models", total=n_sources, info="")
    passes = bar.add_task("  crafting", total=max_passes, info="", visible=False)
    evals = bar.add_task("evaluating", total=None, info="", visible=False)

    def on_event(event: str, info: dict[str, Any]) -> None:
        step = info.get("event")
        if event == "craft":
            resumed = info.get("resumed_passes", 0)
            bar.update(passes, description=f"  crafting on {literal(info['model'])}", completed=resumed, visible=True,
                       info=f"resumed after pass {resumed}" if resumed else "")
        elif event == "craft_step" and step == "progress":  # during a pass
            bar.update(passes, completed=info["pass"] - 1 + info["visited"] / max(1, info["total"]))
        elif event == "craft_step" and step == "pass":  # after each pass
            held = info.get("heldout_fooling_rate")
            bar.update(passes, completed=info["pass"], info=f"fooling rate {pct(info['fooling_rate'])}"
                       + ("" if held is None else f", held-out {pct(held)}"))
        elif event in ("saved", "reused"):
            bar.update(passes, visible=False)
            bar.advance(sources)
            if event == "reused":
                console.print(f"reusing the perturbation crafted on {literal(info['model'])} ({literal(info['path'])})")
        elif event == "baseline":
            bar.update(evals, description=f"{literal(info.get('baseline', 'baseline'))} search on {literal(info['model'])}",
                       visible=True)
        elif event == "evaluate":
            bar.update(evals, completed=info["done"], total=info["total"], visible=True, info=info["desc"])

    return bar, on_event
