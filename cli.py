"""The ``uap`` command line: a thin Typer layer over the library.

Every command calls into ``uap`` or ``models``; anything a command does, the library does.
Bad input (a ``ValueError`` or a missing file raised by the library) becomes one red line on
stderr and exit code 2 — never a traceback.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console

import uap

app = typer.Typer(
    name="uap",
    help="Universal adversarial perturbations: craft them, evaluate them across models, "
    "and train the target models they are measured on.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


class _UsageError(Exception):
    """Raised by the CLI's own argument parsing helpers; shown as one line, exit 2."""


def friendly_errors(fn: Callable) -> Callable:
    """Turn the library's input errors into one clear line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, KeyError, _UsageError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            first, *rest = str(msg).strip().splitlines() or ["invalid input"]
            err_console.print(f"[bold red]error:[/] {first}", highlight=False, soft_wrap=True)
            for line in rest:  # e.g. the list of paths tried for a missing dataset
                err_console.print(f"  {line.strip()}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)

    return wrapper


def parse_eps(text: str) -> float:
    """Parse ``8/255``, ``0.03`` or ``10`` into a positive float."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise _UsageError(f"--eps must be a number or a fraction like 8/255, got {text!r}") from None
    if not value > 0:
        raise _UsageError(f"--eps must be > 0, got {text!r}")
    return value


def parse_norm(text: str) -> float:
    """Parse ``inf``/``linf``, ``2``/``l2`` or ``1``/``l1`` into p."""
    t = text.lower().lstrip("l")
    if t in ("inf", "infinity", "∞"):
        return float("inf")
    if t in ("2", "1"):
        return float(t)
    raise _UsageError(f"--norm must be inf, 2 or 1, got {text!r}")


def _version(value: bool) -> None:
    if value:
        console.print(f"uap {uap.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Universal adversarial perturbations toolkit."""


# ----------------------------------------------------------------------------- craft
# (filled by the engine: issue 3)


# ----------------------------------------------------------------------------- evaluate / transfer
# (filled by evaluation: issue 6)


# ----------------------------------------------------------------------------- train / models
# (filled by the model zoo: issue 4)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
