"""The record that identifies a run: every crafting argument and the fingerprints of its inputs.

The record holds the caller's settings, every :func:`uap.craft` argument (its defaults filled
in, so leaving one out and passing its default are the same run), and SHA-256 fingerprints of
the crafting images, the held-out images and the model's weights — a retrained model or
another image subset is another run even under the same names. Two records are compared entry
by entry (:func:`differences`), so a refusal can name what differs.
"""
from __future__ import annotations

import hashlib
import inspect
import json
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from uap import universal
from uap.fingerprint import tensor_fingerprint
from uap.images import is_images
from uap.initial import describe_init
from uap.projection import check_eps, norm_name

__all__ = ["craft_arguments", "fingerprint", "model_fingerprint", "tensor_fingerprint", "differences",
           "describe_differences", "retired_arguments", "with_added_arguments", "jsonable"]

# uap.craft's keyword arguments and their defaults, read once: the record of a run lists
# them all. Its own arguments ``heldout`` and ``callback`` are RunFolder.craft's, and
# ``resume`` is decided by the folder.
_CRAFT_DEFAULTS: dict[str, Any] = {
    name: param.default for name, param in inspect.signature(universal.craft).parameters.items()
    if param.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("heldout", "callback", "resume")
}

# uap.craft arguments added after records were first written, with the value that gives the
# behaviour of a record that lacks them: such a record is the same run as one that names it.
_ADDED_ARGUMENTS: dict[str, Any] = {"eval_every": 1, "init": None}


def model_fingerprint(model: nn.Module | Sequence[nn.Module]) -> str:
    """SHA-256 over a model's state dict (names, shapes, bytes): changes when it is retrained.
    For several models (an ensemble), over their fingerprints in order."""
    if isinstance(model, (list, tuple)):
        return hashlib.sha256("".join(model_fingerprint(m) for m in model).encode()).hexdigest()
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor_fingerprint(t).encode())
    return h.hexdigest()


def _heldout_fingerprint(heldout: Any) -> str | None:
    if heldout is None:
        return None
    parts = heldout if isinstance(heldout, (tuple, list)) else (heldout,)
    if not all(torch.is_tensor(t) or is_images(t) for t in parts):
        raise ValueError("heldout must be images or an (images, labels) pair of tensors")
    h = hashlib.sha256()
    for t in parts:
        h.update(tensor_fingerprint(t).encode())
    return h.hexdigest()


def craft_arguments(craft_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Every keyword argument of :func:`uap.craft` (but ``heldout``, ``callback``, ``resume``),
    from ``craft_kwargs`` or its default, as JSON values (``norm`` as ``"inf"``/``"2"``/``"1"``).

    Raises ``ValueError`` for an unknown argument or a missing ``eps``.
    """
    kwargs = dict(craft_kwargs)
    own = sorted(set(kwargs) & {"heldout", "callback", "resume"})
    if own:
        raise ValueError(f"{own}: pass heldout and callback to the run itself; resume is decided by the folder")
    unknown = sorted(set(kwargs) - set(_CRAFT_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown uap.craft argument(s) {unknown}; known: {sorted(_CRAFT_DEFAULTS)}")
    args = {name: kwargs.get(name, default) for name, default in _CRAFT_DEFAULTS.items()}
    missing = sorted(name for name, value in args.items() if value is inspect.Parameter.empty)
    if missing:
        raise ValueError(f"uap.craft needs {', '.join(missing)}")
    args["eps"] = check_eps(args["eps"])
    args["norm"] = norm_name(args["norm"])
    args["init"] = describe_init(args["init"])  # a baseline's name, or the fingerprint of the starting tensor
    return jsonable(args)


def fingerprint(model: nn.Module | Sequence[nn.Module], x: torch.Tensor | None, *, settings: Mapping[str, Any] | None = None,
                craft: Mapping[str, Any] | None = None, heldout: Any = None) -> dict[str, Any]:
    """The record that identifies a run: two runs with equal records craft the same ``v``.

    Args:
        model, x: the target (or the list of an ensemble's) and the crafting images
            (fingerprinted, not stored; None: crafted without images).
        settings: the caller's own description of the run (JSON values), e.g. the command
            line's flags or a source model's name.
        craft: the :func:`uap.craft` arguments (see :func:`craft_arguments`).
        heldout: the held-out images (or ``(images, labels)``), fingerprinted: they do not
            change ``v`` but every record of its history.

    Returns ``{"settings", "craft", "model_sha256", "craft_set_sha256", "heldout_sha256"}``
    as canonical JSON values (what ``json.loads(json.dumps(...))`` gives back).
    """
    return jsonable({
        "settings": dict(settings or {}),
        "craft": dict(craft or {}),
        "model_sha256": model_fingerprint(model),
        "craft_set_sha256": None if x is None else tensor_fingerprint(x),
        "heldout_sha256": _heldout_fingerprint(heldout),
    })


def jsonable(obj: Any) -> Any:
    """``obj`` as JSON gives it back (tuples → lists, paths → text …)."""
    return json.loads(json.dumps(obj, default=str))


def _canonical(record: Any) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)


def differences(saved: Any, wanted: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the entries where two records differ (for error messages)."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        out: list[str] = []
        for key in sorted(set(saved) | set(wanted), key=str):
            if key not in saved or key not in wanted:
                out.append(f"{prefix}{key}")
            else:
                out += differences(saved[key], wanted[key], f"{prefix}{key}.")
        return out
    return [] if _canonical(saved) == _canonical(wanted) else [prefix.rstrip(".") or "record"]


def describe_differences(diffs: list[str]) -> str:
    """``"different settings (a, b.c …)"`` for :func:`differences`' paths."""
    shown = ", ".join(diffs[:6]) + (f" and {len(diffs) - 6} more" if len(diffs) > 6 else "")
    return f"different settings ({shown})"


def retired_arguments(saved: Any) -> list[str]:
    """The :func:`uap.craft` arguments a saved record names that :func:`uap.craft` no longer
    takes: such a record was written by an older version, and no run of this one matches it."""
    craft = saved.get("craft") if isinstance(saved, dict) else None
    return sorted(set(craft) - set(_CRAFT_DEFAULTS)) if isinstance(craft, dict) else []


def with_added_arguments(saved: Any) -> Any:
    """``saved`` (a run's record) with the :func:`uap.craft` arguments added since it may have been
    written filled in with the value that reproduces its run (e.g. ``eval_every=1``)."""
    craft = saved.get("craft") if isinstance(saved, dict) else None
    if not isinstance(craft, dict):
        return saved
    return {**saved, "craft": {**_ADDED_ARGUMENTS, **craft}}
