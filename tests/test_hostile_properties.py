"""Random junk against the parsers and validators (RELIABILITY.md): either a valid parse, or one
clear error — for the command line, one line on stderr and exit code 2; for the library, a
ValueError — never a traceback, never another exception type.

The CLI examples stop before any work: a valid parse reaches the model loader, which is
replaced by one that raises :class:`_Reached`.
"""
from __future__ import annotations

import math
import string

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cli
from tests.hostile import MODEL, invoke, one_line_error
from uap.forward import check_images
from uap.projection import check_eps, check_norm
from uap.targets import ModelSpecError, Normalized, resolve_model

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
#: Whole-command examples cost a Typer parse each (~0.1 s): fewer of them, the parsers above get the many.
COMMANDS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

#: Text a hostile user types: digits, signs, fraction bars, letters, markup, control characters.
JUNK = st.lists(st.sampled_from(list("0123456789+-./eE,=:[]") + ["nan", "inf", " ", "\x1b", "\n", "\t", "\x00",
                                                                  "[/]", "[bold]", "x", "\u202e", "ε"]),
                max_size=8).map("".join)
NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-10, 400).map(str),
                    st.tuples(st.integers(-5, 400), st.integers(-3, 300)).map(lambda t: f"{t[0]}/{t[1]}"))


class _Reached(Exception):
    """The command got past parsing and validation to the model loader."""


@pytest.fixture()
def stop_at_the_loader(monkeypatch):
    import uap.data
    import uap.targets

    def reached(*args, **kwargs):
        raise _Reached

    monkeypatch.setattr(uap.targets, "resolve_model", reached)
    monkeypatch.setattr(uap.data, "load", reached)


def _contract(result) -> bool:
    """True when the command parsed and reached the loader; otherwise assert the one-line error."""
    if isinstance(result.exception, _Reached):
        return True
    one_line_error(result)
    return False


# ---------------------------------------------------------------------------- the CLI's parsers

@FAST
@given(text=st.one_of(JUNK, NUMBERS))
def test_parse_eps_is_a_finite_positive_number_or_a_usage_error(text):
    try:
        value = cli.options.parse_eps(text)
    except cli.UsageError as e:
        assert str(e).startswith("--eps") and "\n" not in str(e).replace(repr(text), "")
        return
    assert math.isfinite(value) and value > 0
    num, _, den = text.partition("/")
    assert value == (float(num) / float(den) if den else float(text))


@FAST
@given(text=st.one_of(JUNK, st.sampled_from(["inf", "linf", "L2", "l1", "2", "1", "∞", "Infinity", "3", "l0"])))
def test_parse_norm_is_one_of_three_or_a_usage_error(text):
    try:
        p = cli.options.parse_norm(text)
    except cli.UsageError as e:
        assert str(e).startswith("--norm must be inf, 2 or 1")
        return
    assert p in (1.0, 2.0, math.inf) and p == check_norm(text if text != "∞" else "inf")


@COMMANDS
@given(eps=st.one_of(JUNK, NUMBERS), norm=st.one_of(JUNK, st.sampled_from(["inf", "2", "1"])),
       mean=st.one_of(st.none(), JUNK), std=st.one_of(st.none(), JUNK), option=st.lists(JUNK, max_size=2))
def test_craft_options_parse_or_fail_in_one_line(stop_at_the_loader, tmp_path_factory, eps, norm, mean, std, option):
    out = tmp_path_factory.mktemp("o") / "run"
    args = ["craft", "--model", MODEL, "--method", "sgd", "--eps", eps, "--norm", norm, "--out", str(out)]
    args += [] if mean is None else ["--mean", mean]
    args += [] if std is None else ["--std", std]
    for item in option:
        args += ["--method-option", item]
    if not _contract(invoke(*args)):
        assert not out.exists()


@COMMANDS
@given(key=st.sampled_from(["batch_size", "step_size", "decay", "beta", "nope", ""]),
       value=st.one_of(JUNK, st.sampled_from(["8", "0.5", "-1", "true", "null", "[1]", '"x"', "1e9", "NaN"])))
def test_method_options_parse_or_fail_in_one_line(stop_at_the_loader, tmp_path_factory, key, value):
    out = tmp_path_factory.mktemp("o") / "run"
    _contract(invoke("craft", "--model", MODEL, "--method", "sgd", "--method-option", f"{key}={value}",
                     "--out", str(out)))


# ---------------------------------------------------------------------------- model specs

#: Modules safe to import and whose argument-free callables are harmless to call.
SAFE_MODULES = ["math", "json", "string", "torch.nn", "tests.tiny_models"]


@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_model_specs_resolve_or_are_a_model_spec_error(data):
    module = data.draw(st.sampled_from(SAFE_MODULES))
    imported = __import__(module, fromlist=["_"])
    attr = data.draw(st.one_of(st.sampled_from(sorted(a for a in dir(imported) if not a.startswith("_"))),
                               st.text(alphabet=string.ascii_letters + "_[]/", min_size=1, max_size=8)))
    _resolves_or_is_a_model_spec_error(
        data.draw(st.sampled_from([f"{module}:{attr}", f"{module}:", f":{attr}", attr, f"[{attr}]"])))


def _resolves_or_is_a_model_spec_error(spec: str) -> None:
    try:
        model, model_id = resolve_model(spec)
    except (ModelSpecError, FileNotFoundError):
        return
    assert isinstance(model, torch.nn.Module) and model_id == spec and not model.training, spec


def test_every_public_attribute_of_the_safe_modules_resolves_or_is_a_model_spec_error():
    """The exhaustive version of the property above for ``module:attr``: the random draws reach a
    rare kind of attribute (a lazy module such as ``torch.nn.LazyInstanceNorm1d``) only now and then."""
    for module in SAFE_MODULES:
        imported = __import__(module, fromlist=["_"])
        for attr in sorted(a for a in dir(imported) if not a.startswith("_")):
            _resolves_or_is_a_model_spec_error(f"{module}:{attr}")


# ---------------------------------------------------------------------------- the library's validators

@FAST
@given(value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5), JUNK, st.none()),
       p=st.sampled_from(["inf", 2, 1, None]))
def test_check_eps_returns_a_valid_budget_or_raises_value_error(value, p):
    try:
        eps = check_eps(value, p)
    except ValueError as e:
        assert str(e).startswith(("eps must be", "an ℓ∞ eps"))
        return
    assert math.isfinite(eps) and eps > 0 and (p != "inf" or eps <= 1)


@FAST
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=24),
       shape=st.sampled_from([(1, 1, 2, 2), (2, 3, 2, 2), (4,), (2, 2), (0, 3, 2, 2)]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.uint8, torch.int64]))
def test_check_images_accepts_unit_range_images_or_raises_value_error(values, shape, dtype):
    n = math.prod(shape)
    x = torch.tensor((values * (n // len(values) + 1))[:n], dtype=torch.float64).reshape(shape)
    x = x.to(dtype) if dtype.is_floating_point else x.nan_to_num(0).clamp(-1e6, 1e6).to(dtype)
    try:
        assert check_images(x) is x
    except ValueError:
        return
    assert x.dim() == 4 and x.numel() > 0 and x.is_floating_point()
    assert bool(torch.isfinite(x).all()) and float(x.min()) >= -1e-6 and float(x.max()) <= 1 + 1e-6


@FAST
@given(mean=st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4),
       std=st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4), channels=st.sampled_from([None, 3]))
def test_normalisation_is_valid_or_a_model_spec_error(mean, std, channels):
    try:
        Normalized.check(mean, std, channels)
    except ModelSpecError:
        return
    assert len(mean) == len(std) >= 1 and all(map(math.isfinite, mean)) and all(s > 0 and math.isfinite(s) for s in std)
    assert channels is None or len(mean) in (1, channels)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=256))
def test_any_bytes_as_a_perturbation_file_load_or_raise_value_error(tmp_path_factory, raw):
    from uap import Perturbation

    path = tmp_path_factory.mktemp("p") / "junk.safetensors"
    path.write_bytes(raw)
    with pytest.raises(ValueError):
        Perturbation.load(path)
