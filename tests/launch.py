"""How the tests start the ``uap`` command in a separate process.

The command is the console script installed next to the interpreter that runs the tests, not
whichever ``uap`` comes first on ``PATH`` (``venv/bin/python -m pytest`` without an activated
venv finds none, or another environment's). Where no script is installed (a checkout run with
``PYTHONPATH`` alone), the same entry point, :func:`cli.main`, runs through that interpreter, so
a test that launches the CLI never needs to skip.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

#: Runs ``cli.main`` with the interpreter's arguments, like the console script does.
_ENTRY = "import sys; sys.argv[0] = 'uap'; from cli import main; main()"


def uap_command() -> list[str]:
    """The argv prefix that runs ``uap`` with the tests' interpreter: its installed console
    script, or ``python -c`` calling :func:`cli.main` when the script is not installed."""
    script = Path(sys.executable).parent / "uap"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", _ENTRY]


def torchrun_command(nproc: int = 2) -> list[str]:
    """``torchrun`` (as ``python -m torch.distributed.run``) on ``nproc`` local processes, each
    running :func:`uap_command`; append the ``uap`` arguments."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "--no-python", *uap_command()]
