"""CI's rule for skipped tests: a skip is allowed only for hardware the machine lacks.

With ``UAP_CI_NO_SKIPS=1`` in the environment (``.ci/run`` sets it), a test skipped for any
other reason — an optional package not installed, a data set not found, a script not on
``PATH`` — fails the run: the closing line still counts it as skipped, a section above it names
each such test with its reason, and pytest exits with status 1. Without the variable, skips are
only reported (``-ra``), so a checkout without the optional extras still runs.

A hardware skip is one whose reason names a GPU or CUDA (``"needs a CUDA GPU"``, and also
``"checks the message on machines without CUDA"``, which skips where a GPU is present).

The tests' ``conftest.py`` loads this module as a plugin; ``pytest -p tests.skip_policy`` loads
it in other pytest runs.
"""
from __future__ import annotations

import os
import re

import pytest

#: The environment variable that turns the rule on.
ENV = "UAP_CI_NO_SKIPS"

#: Skip reasons that are about hardware (matched anywhere in the reason).
HARDWARE = re.compile(r"\b(GPU|CUDA)\b", re.IGNORECASE)


def skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    """The reason a skipped test report gives (``pytest.skip``'s message or a ``skipif``'s reason)."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def is_hardware_reason(reason: str) -> bool:
    """Whether a skip ``reason`` is hardware the machine lacks (a GPU, CUDA)."""
    return HARDWARE.search(reason) is not None


class SkipPolicy:
    """The plugin: collects skips (of tests, and of modules at collection) whose reason is not
    hardware, names them above pytest's closing line, and makes the session's status 1."""

    def __init__(self) -> None:
        self.refused: list[tuple[str, str]] = []  # (test id, reason)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            self._check(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:  # a whole module skipped at import (``pytest.importorskip`` at the top)
            self._check(report)

    def _check(self, report: pytest.TestReport | pytest.CollectReport) -> None:
        reason = skip_reason(report)
        if not is_hardware_reason(reason):
            self.refused.append((report.nodeid, reason))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.refused:
            terminalreporter.section(f"{ENV}: skips that need no GPU", sep="=", red=True, bold=True)
            for nodeid, reason in self.refused:
                terminalreporter.line(f"SKIPPED {nodeid}: {reason}")
            terminalreporter.line(f"{len(self.refused)} test(s) skipped for a reason other than a GPU: "
                                  "install the extras they need (.ci/run installs .[test,hub])", red=True)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.refused and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config: pytest.Config) -> None:
    """Registers :class:`SkipPolicy` when ``UAP_CI_NO_SKIPS=1``."""
    if os.environ.get(ENV) == "1" and not config.pluginmanager.has_plugin("uap-skip-policy"):
        config.pluginmanager.register(SkipPolicy(), "uap-skip-policy")
