"""The ``uap`` command line: one thin module per command over the library.

Each command parses its options (:mod:`cli.options`), makes one library call and prints
(:mod:`cli.show`). Bad input — a ``ValueError``-family error or a missing file raised by the
library, or a :class:`UsageError` from the parsing here — becomes one red line on stderr and
exit code 2, never a traceback; Click's own usage errors get the same line.
"""
from __future__ import annotations

import functools
import os
import signal
import sys
import warnings
from typing import Callable

import typer
import typer.core

import uap
from cli.console import console, err_console, literal, print_error, print_warning
from cli.options import UsageError

__all__ = ["app", "main", "friendly_errors", "UsageError", "literal", "invoked_args"]

_INVOKED: list[list[str]] = [[]]  # the arguments of the command being run (after `uap`)


def invoked_args() -> list[str]:
    """The arguments the running command was given (``craft --model …``), for messages that
    show a command to run next."""
    return list(_INVOKED[0])

# Click's exception classes, whichever Click typer runs on (its own vendored copy in recent
# versions, the click package before): found through typer's public BadParameter.
_CLICK_ERROR, _CLICK_USAGE_ERROR = (next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)
                                    for name in ("ClickException", "UsageError"))


class _OneLineErrors(typer.core.TyperGroup):
    """Click's own usage errors (an unknown option or command, a value of the wrong type or out of
    its range, a missing value) as the same one line as every other input error, exit code 2,
    instead of Click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        _INVOKED[0] = [str(a) for a in (sys.argv[1:] if args is None else args)]
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _CLICK_ERROR as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `uap`: the help is already printed
                sys.exit(e.exit_code)
            ctx = getattr(e, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if isinstance(e, _CLICK_USAGE_ERROR) and ctx else ""
            print_error(e.format_message() + hint)
            sys.exit(e.exit_code)
        except typer.Abort:
            print_error("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="uap",
    help="Universal adversarial perturbations: craft them, evaluate them across models, "
    "and train the target models they are measured on.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_OneLineErrors,
)


def friendly_errors(fn: Callable) -> Callable:
    """Run a command with the library's input errors as one clear line on stderr and exit
    code 2, and its warnings as one yellow line each."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = lambda message, *_args, **_kw: print_warning(message)
                return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, KeyError, UsageError) as e:
            print_error(e.args[0] if isinstance(e, KeyError) and e.args else e)
            raise typer.Exit(2)

    return wrapper


def command(name: str) -> Callable:
    """Register ``fn`` as the command ``name``, with :func:`friendly_errors`."""
    return lambda fn: app.command(name)(friendly_errors(fn))


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


def _argv_device() -> str:
    """The ``--device`` the command line names (for the process group's backend), else ``cpu``."""
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg == "--device" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--device="):
            return arg.partition("=")[2]
    return "cpu"


class _Terminated(Exception):
    """SIGTERM arrived (torchrun ends the remaining ranks this way when one fails)."""


def _terminated(signum: int, frame: object) -> None:
    raise _Terminated()


def main() -> None:
    """Console-script entry point. Under ``torchrun`` (``WORLD_SIZE`` > 1) every command runs in
    the process group torchrun describes (gloo on CPU, NCCL with ``--device cuda``): the ranks
    share the work, and only rank 0 prints and writes. A rank whose peer failed stops with one
    line instead of a traceback."""
    import torch

    from uap import distributed

    device = torch.device("cuda" if _argv_device().startswith("cuda") else "cpu")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched:  # torchrun stops the other ranks with SIGTERM when one fails: unwind, release locks
        signal.signal(signal.SIGTERM, _terminated)
    try:
        with distributed.process_group(device):
            if not distributed.is_main():
                console.quiet = True
            app()
    except (RuntimeError, _Terminated) as e:  # a peer is gone (and printed its own error)
        if not launched:
            raise
        reason = "stopped by the launcher" if isinstance(e, _Terminated) else (
            str(e).strip().splitlines() or ["a collective operation failed"])[0]
        err_console.print(f"[bold red]error:[/] rank {os.environ.get('RANK', '?')} stopped: another rank failed "
                          f"({literal(reason)})", highlight=False, soft_wrap=True)
        raise SystemExit(1) from None


# The commands register themselves on ``app``.
from cli import audit, craft, evaluate, models, sweep, train, transfer  # noqa: E402,F401
