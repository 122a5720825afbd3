"""Checkpoints as people save them: find the state dict in a file and match it to a model.

Why: a weights file is rarely ``torch.save(model.state_dict())`` of the very module that
loads it. Training scripts save ``{"epoch": …, "state_dict": …, "optimizer": …}``;
``DataParallel`` / ``DistributedDataParallel`` prefix every key with ``module.`` and
``torch.compile`` with ``_orig_mod.``; a Lightning module adds its attribute's name
(``model.``); a port of the same network from another project names every tensor its own way
(``_blocks.0._depthwise_conv.weight`` for ``blocks.0.0.conv_dw.weight``) but keeps them in the
same order. All of these load here without the user converting anything:

- :func:`unnest_state_dict` — the state dict inside a checkpoint: the file's dict itself when
  its values are tensors, else the dict under the first of :data:`NESTED_KEYS` it has
  (``state_dict``, ``model_state_dict``, ``model``, ``module``, ``net``, ``ema`` …, repeatedly),
  else its only dict of tensors.
- :func:`fit_state_dict` — the same tensors under the model's names when one renaming gives
  exactly the model's names: none, the wrappers' prefixes removed, the file's common first
  name part removed, or the model's added; else, when the file shares no name with the model,
  by position, provided the tensors agree in number, shape and role (``weight``, ``bias``,
  ``running_mean`` …) at every position.
- :func:`describe_mismatch` — what does not fit, in one line: the first missing and the first
  unexpected tensor with their shapes, the first tensor whose shape differs, and the likely
  cause (a prefix, the nesting, another architecture or variant).

Batch-norm counters (``num_batches_tracked``) take no part in matching: a file without them
loads (torch fills them), and a foreign layout's are dropped.
Nothing here reads files; :func:`uap.targets.load_weights` does, without unpickling code.
"""
from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["NESTED_KEYS", "WRAPPER_PREFIXES", "unnest_state_dict", "fit_state_dict", "describe_mismatch"]

#: Keys under which checkpoints keep the state dict, in the order they are tried (the raw
#: weights before an exponential moving average of them when a file has both).
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network",
               "ema", "model_ema", "state_dict_ema", "ema_state_dict")

#: Name parts that wrappers add to every key: ``module.`` (DataParallel, DistributedDataParallel,
#: timm's EMA) in front, ``_orig_mod.`` (``torch.compile``) in front of each compiled module's names.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_COUNTER = "num_batches_tracked"


def unnest_state_dict(checkpoint: object) -> dict | None:
    """The state dict inside ``checkpoint`` (see the module docstring); None when there is no
    dict of tensors in it."""
    for _ in range(4):  # {"model": {"state_dict": …}} at most a few levels deep
        if not isinstance(checkpoint, Mapping) or not checkpoint:
            return None
        if all(torch.is_tensor(v) for v in checkpoint.values()):
            return dict(checkpoint) if not isinstance(checkpoint, dict) else checkpoint
        inner = next((checkpoint[k] for k in NESTED_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
        if inner is None:
            tensors = [v for v in checkpoint.values() if isinstance(v, Mapping) and v
                       and all(torch.is_tensor(t) for t in v.values())]
            inner = tensors[0] if len(tensors) == 1 else None
        if inner is None:
            return checkpoint if any(torch.is_tensor(v) for v in checkpoint.values()) else None
        checkpoint = inner
    return None


def fit_state_dict(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """``state`` under the names of ``expected`` (a model's ``state_dict()``) when a renaming
    or the order explains the difference (see the module docstring); ``state`` unchanged
    when nothing does (strict loading then fails, and :func:`describe_mismatch` says why)."""
    wanted = _names(expected)
    for _, renamed in _renamings(state, expected):
        if _names(renamed) == wanted:
            return renamed
    mapped, _ = _by_position(_unwrapped(state), expected)
    return state if mapped is None else mapped


def describe_mismatch(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str:
    """Why ``state`` does not load into a model with state dict ``expected``, in one line:
    ``(likely cause): first missing …, first unexpected …, first mis-shaped …``."""
    wanted = _names(expected)
    how, best = max(_renamings(state, expected), key=lambda item: len(_names(item[1]) & wanted))
    have = _names(best)
    missing = [k for k in expected if k in wanted - have]
    unexpected = [k for k in best if k in have - wanted]
    reshaped = [k for k in best if k in wanted and tuple(best[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing {_tensor(missing[0], expected)}" + _more(missing))
    if unexpected:
        parts.append(f"unexpected {_tensor(unexpected[0], best)}" + _more(unexpected))
    if reshaped:
        k = reshaped[0]
        parts.append(f"{k} is {_shape(best[k])} in the file, {_shape(expected[k])} in the model" + _more(reshaped))
    if not have & wanted:
        _, position = _by_position(_unwrapped(state), expected)
        if position:  # as many tensors under other names: another layout, or another network
            return (f"(the file names its tensors in another layout, and matched by position they differ: "
                    f"{position})")
        if not state:
            cause = "the file holds no tensors"
        else:
            cause = "weights of another architecture?"
    elif reshaped and not missing and not unexpected:
        cause = "the same names with other shapes: another variant or number of classes?"
    else:
        cause = "weights of another architecture?"
    if how:
        cause += f"; compared after {how}"
    return f"({cause}): " + ("; ".join(parts) or "torch refused the state dict")


# ----------------------------------------------------------------------------- helpers


def _names(state: Mapping[str, object]) -> set[str]:
    """The names that must match: every tensor but the batch-norm counters."""
    return {k for k in state if not k.endswith(_COUNTER)}


def _unwrapped(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the wrappers' prefixes (:data:`WRAPPER_PREFIXES`)."""
    out = {}
    for key, value in state.items():
        while key.startswith("module."):
            key = key[len("module."):]
        out[key.replace("_orig_mod.", "")] = value
    return out


def _common_head(keys) -> str:
    """The first name part (``model.``) every key shares; empty when they share none."""
    heads = {k.partition(".")[0] + "." if "." in k else "" for k in keys}
    return heads.pop() if len(heads) == 1 else ""


def _renamings(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]):
    """``(what was done, renamed state)`` for each renaming tried, the identity first."""
    yield "", state
    plain = _unwrapped(state)
    if list(plain) != list(state):
        yield "removing the prefixes " + "/".join(p for p in WRAPPER_PREFIXES if any(p in k for k in state)), plain
    head = _common_head(plain)
    if head and not _common_head(expected) == head:
        yield f"removing the prefix {head!r} of every key", {k[len(head):]: v for k, v in plain.items()}
    head = _common_head(expected)
    if head and not _common_head(plain) == head:
        yield f"adding the model's prefix {head!r}", {head + k: v for k, v in plain.items()}


def _role(key: str) -> str:
    return key.rpartition(".")[2]


def _by_position(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> tuple[dict | None, str]:
    """``(state under the model's names, "")`` when the file shares no name with the model and
    its tensors agree with the model's in number, shape and role at every position; else
    ``(None, the first difference or "")``."""
    if not state or _names(state) & _names(expected):
        return None, ""
    ours = [k for k in state if not k.endswith(_COUNTER)]
    theirs = [k for k in expected if not k.endswith(_COUNTER)]
    if len(ours) != len(theirs):
        return None, ""
    for a, b in zip(ours, theirs):
        if tuple(state[a].shape) != tuple(expected[b].shape) or _role(a) != _role(b):
            return None, f"the first out of place is {_tensor(a, state)} in the file where the model has {_tensor(b, expected)}"
    return {b: state[a] for a, b in zip(ours, theirs)}, ""


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _tensor(key: str, state: Mapping[str, torch.Tensor]) -> str:
    return f"{key} {_shape(state[key])}"


def _more(keys: list) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""

