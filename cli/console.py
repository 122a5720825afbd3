"""Where the command line prints: one console for results, one for errors, everything literal."""
from __future__ import annotations

import unicodedata

from rich.console import Console
from rich.markup import escape

__all__ = ["console", "err_console", "literal", "print_error", "print_warning", "pct"]

console = Console()
err_console = Console(stderr=True)


def literal(text: object) -> str:
    """``text`` made safe to print through rich: markup escaped (``[/]`` prints as itself) and
    control characters, newlines included, written as escapes (``\\x1b``), so a user's value
    can neither style the terminal, move its cursor, nor break a one-line message in two."""
    out = []
    for ch in str(text):
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):  # controls, bidi/format marks, line breaks
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return escape("".join(out))


def print_error(message: object) -> None:
    """The one line every input error becomes: ``error: MESSAGE`` on stderr, printed literally."""
    text = str(message).strip() or "invalid input"
    err_console.print(f"[bold red]error:[/] {literal(text)}", highlight=False, soft_wrap=True)


def print_warning(message: object) -> None:
    """A library warning (e.g. bf16 falling back to fp32) as one yellow line on stderr."""
    err_console.print(f"[bold yellow]warning:[/] {literal(str(message).strip())}", highlight=False, soft_wrap=True)


def pct(value: float | None) -> str:
    """A rate as ``"51.7 %"`` (``"–"`` for None or NaN)."""
    return "–" if value is None or value != value else f"{100 * value:.1f} %"
