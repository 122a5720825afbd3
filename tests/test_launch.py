"""The tests' way of starting ``uap`` in a process (:mod:`tests.launch`): the console script
next to the interpreter, else the interpreter itself; either runs this checkout's CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import uap
from tests import launch

REPO = Path(__file__).resolve().parents[1]


def test_the_script_next_to_the_interpreter_is_preferred(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    assert launch.uap_command() == [str(tmp_path / "python"), "-c", launch._ENTRY]  # none installed
    (tmp_path / "uap").write_text("#!/bin/sh\n")
    (tmp_path / "uap").chmod(0o755)
    assert launch.uap_command() == [str(tmp_path / "uap")]
    assert launch.torchrun_command(3)[-1] == str(tmp_path / "uap")


@pytest.mark.parametrize("form", ["uap_command", "interpreter"])
def test_either_form_runs_this_checkout_without_uap_on_path(form):
    command = launch.uap_command() if form == "uap_command" else [sys.executable, "-c", launch._ENTRY]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": os.defpath}  # no `uap` to find on PATH
    done = subprocess.run([*command, "--version"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"uap {uap.__version__}"
