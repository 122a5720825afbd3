"""``uap models``: the model zoo, or the external model sources and whether their libraries are installed."""
from __future__ import annotations

import typer
from rich.table import Table

from cli import command
from cli.console import console, literal, pct

__all__ = ["models_cmd"]

_ZOO_COLUMNS = ("name", "builder", "method", "backbone", "epochs", "linear probe", "kNN", "zero-shot", "random init", "MB")


@command("models")
def models_cmd(
    external: bool = typer.Option(False, "--external", help="List the external model sources (torchvision, timm …): "
                                  "the spellings they take and whether their library is installed."),
) -> None:
    """List the model zoo (name, method, backbone, accuracies, size), or the external model sources.

    Example: uap models   (NAME@knn is any entry's encoder with a kNN head, e.g. --models supervised@knn);
    uap models --external
    """
    console.print(_sources_table() if external else _zoo_table())


def _zoo_table() -> Table:
    import models as zoo

    table = Table(title="uap model zoo")
    for col in _ZOO_COLUMNS:
        table.add_column(col)
    for name, card in zoo.cards().items():
        def score(key: str) -> str:
            v = card.get(key)
            return pct(v) if isinstance(v, (int, float)) else "-"

        table.add_row(*map(literal, (name, card.get("builder", "-"), card.get("method", "-"), card.get("backbone", "-"),
                                     card.get("epochs", "-"))), score("linear_probe_acc"), score("knn_acc"),
                      score("zero_shot_acc"), score("random_init_linear_probe_acc"), f"{card.get('size_bytes', 0) / 1e6:.1f}")
    return table


def _sources_table() -> Table:
    import importlib.util

    from uap.targets import model_sources

    table = Table(title="external model sources")
    for col in ("source", "spellings", "weights file", "library", "installed weights (no weights file needed)"):
        table.add_column(col)
    for name, source in model_sources().items():
        if source.bare:  # the zoo (and any source answering bare names) is what plain `uap models` lists
            continue
        lib = source.library
        status = "-" if not lib else (f"{lib}: installed" if importlib.util.find_spec(lib) is not None
                                      else f"{lib}: [red]not installed[/] (pip install 'uap[hub]')")
        ready = ", ".join(f"{name}:{model}" for model in source.ready()) or "-"
        table.add_row(name, literal(source.help or f"{name}:NAME"), "yes" if source.weights else "no", status, literal(ready))
    return table
