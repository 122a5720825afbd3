"""CI's rule for skipped tests (:mod:`tests.skip_policy`): under ``UAP_CI_NO_SKIPS=1`` a skip
fails the run unless it is for a GPU; without the variable, skips are only reported."""
from __future__ import annotations

import pytest

from tests.skip_policy import ENV, is_hardware_reason

INNER = '''
import pytest

def test_runs():
    pass

def test_needs_a_gpu():
    pytest.skip("needs a CUDA GPU")

@pytest.mark.skipif(True, reason="checks the message on machines without CUDA")
def test_needs_no_gpu():
    pass
'''

DROPPED = '''
import pytest

@pytest.fixture
def sample():
    pytest.skip("the ImageNet sample not found")

def test_extra_missing():
    pytest.importorskip("a_package_that_is_not_installed")

def test_data_missing(sample):
    pass
'''

MODULE = '''
import pytest

optional = pytest.importorskip("another_package_that_is_not_installed")

def test_never_collected():
    pass
'''


def _run(pytester: pytest.Pytester, monkeypatch, on: bool, *files: str) -> pytest.RunResult:
    if on:
        monkeypatch.setenv(ENV, "1")
    else:
        monkeypatch.delenv(ENV, raising=False)
    pytester.makepyfile(**{f"test_inner_{i}": text for i, text in enumerate(files)})
    return pytester.runpytest_inprocess("-p", "tests.skip_policy", "-p", "no:cacheprovider")


def test_gpu_skips_are_allowed(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, True, INNER)
    result.assert_outcomes(passed=1, skipped=2)
    assert result.ret == pytest.ExitCode.OK


def test_other_skips_fail_the_run_and_are_named(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, True, INNER, DROPPED, MODULE)
    result.assert_outcomes(passed=1, skipped=5)  # the closing line still counts them as skipped
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        f"*{ENV}: skips that need no GPU*",
        "SKIPPED test_inner_2.py: *another_package_that_is_not_installed*",  # at collection, first
        "SKIPPED test_inner_1.py::test_extra_missing: *a_package_that_is_not_installed*",
        "SKIPPED test_inner_1.py::test_data_missing: the ImageNet sample not found",
        "3 test(s) skipped for a reason other than a GPU*",
        "*1 passed, 5 skipped*",
    ])
    assert "test_needs_a_gpu:" not in result.stdout.str()


def test_without_the_variable_skips_are_only_reported(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, False, INNER, DROPPED, MODULE)
    result.assert_outcomes(passed=1, skipped=5)
    assert result.ret == pytest.ExitCode.OK


def test_hardware_reasons():
    assert is_hardware_reason("needs a CUDA GPU") and is_hardware_reason("no gpu here")
    assert not is_hardware_reason("could not import 'timm': No module named 'timm'")
    assert not is_hardware_reason("CIFAR-10 not found: set UAP_DATA_DIR")
