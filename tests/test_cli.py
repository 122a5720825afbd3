"""The CLI shell: help lists every command, --version, and argument parsing helpers."""
from __future__ import annotations

import subprocess
from pathlib import Path
import sys

import pytest
from typer.testing import CliRunner

import cli
import uap

runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(cli.app, ["--help"])
    assert result.exit_code == 0
    for command in ("craft", "evaluate", "transfer", "train", "models"):
        assert command in result.output
        sub = runner.invoke(cli.app, [command, "--help"])
        assert sub.exit_code == 0 and "Example: uap" in sub.output, command


def test_version():
    result = runner.invoke(cli.app, ["--version"])
    assert result.exit_code == 0 and uap.__version__ in result.output


@pytest.mark.parametrize("text,value", [("8/255", 8 / 255), ("0.5", 0.5), ("10", 10.0)])
def test_parse_eps(text, value):
    assert cli.options.parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["0", "-1/255", "abc", "1/0", "8/"])
def test_parse_eps_rejects(text):
    with pytest.raises(cli.UsageError):
        cli.options.parse_eps(text)


@pytest.mark.parametrize("text,p", [("inf", float("inf")), ("linf", float("inf")), ("2", 2.0), ("l1", 1.0)])
def test_parse_norm(text, p):
    assert cli.options.parse_norm(text) == p


def test_friendly_errors_one_line_exit_2():
    @cli.friendly_errors
    def boom():
        raise ValueError("eps must be > 0")

    import typer

    with pytest.raises(typer.Exit) as e:
        boom()
    assert e.value.exit_code == 2


def test_console_script_runs_without_traceback():
    out = subprocess.run([sys.executable, "-m", "cli", "--version"], capture_output=True, text=True, cwd=str(Path(cli.__file__).parent.parent))
    assert out.returncode == 0 and uap.__version__ in out.stdout
