"""Typed option sets that validate themselves.

A crafting method (and DeepFool) declares its knobs as a frozen dataclass deriving from
:class:`Options`; :meth:`Options.parse` turns a user's mapping (from Python, or from
``--method-option KEY=VALUE`` on the command line) into an instance. Unknown keys and values
of the wrong type are a ``ValueError`` that names the method and the known options, so a
typo never silently falls back to a default. Range checks that a type cannot express live in
each class's :meth:`Options.check`.

Example::

    @dataclass(frozen=True)
    class StepOptions(Options):
        batch_size: int = 32
        step_size: float = 0.1

        def check(self) -> None:
            require(self.batch_size >= 1, f"batch_size must be ≥ 1, got {self.batch_size}")

    StepOptions.parse({"batch_size": 8}, owner="method 'sgd'")   # StepOptions(batch_size=8, step_size=0.1)
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, Literal, Mapping, TypeVar, Union

__all__ = ["Options", "require"]

O = TypeVar("O", bound="Options")


def require(condition: bool, message: str) -> None:
    """``ValueError(message)`` unless ``condition``."""
    if not condition:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class Options:
    """Base class of option dataclasses (see the module docstring)."""

    @classmethod
    def parse(cls: type[O], values: Mapping[str, Any] | O | None = None, *, owner: str = "") -> O:
        """An instance from ``values`` (missing keys take their defaults).

        ``owner`` names what the options belong to in error messages (e.g. ``"method 'sgd'"``).
        """
        if isinstance(values, cls):
            return values
        values = dict(values or {})
        hints = _field_types(cls)
        known = list(hints)
        where = f" for {owner}" if owner else ""
        unknown = sorted(set(values) - set(known))
        if unknown:
            listed = ", ".join(known) if known else "none"
            raise ValueError(f"unknown option(s) {unknown}{where}; known: {listed}")
        for key, value in values.items():
            if not _fits(value, hints[key]):
                raise ValueError(f"option {key}{where} must be {_describe(hints[key])}, got {value!r}")
        options = cls(**values)
        options.check()
        return options

    def check(self) -> None:
        """Raise ``ValueError`` for values that are well-typed but out of range."""

    def to_dict(self) -> dict[str, Any]:
        """The options as a plain dict (JSON-serialisable for the built-in methods)."""
        return dataclasses.asdict(self)

    def changed(self) -> dict[str, Any]:
        """The options whose value differs from the default."""
        default = type(self)()
        return {k: v for k, v in self.to_dict().items() if getattr(default, k) != v}


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    """``{field name: resolved annotation}`` of an options dataclass, in field order (cached:
    options are parsed once per DeepFool call)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is an instance of the annotation ``hint`` (bool is never a number)."""
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        return any(_fits(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    name = getattr(origin or hint, "__name__", str(hint))
    return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
            "dict": "a mapping"}.get(name, name)
