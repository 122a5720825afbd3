"""Batch-norm folding: an attack-only copy of a model with each eval-mode BatchNorm merged
into the convolution or linear layer that feeds it.

In eval mode a BatchNorm layer is a fixed per-channel affine map, so ``bn(conv(x))`` is one
convolution with rescaled weights and a bias: the same function, one operator fewer in the
forward pass and one fewer in every backward pass. Attacks run many backward passes per
image (DeepFool one per candidate class and step), so batch norm's share of each pass is
saved many times over; BENCHMARKS.md measures what that is worth.

The copy is found by tracing the model with ``torch.fx`` (modules held as plain attributes
are traced through); a layer pair is folded only when
the BatchNorm's single input is the output of a convolution (or linear layer) used nowhere
else, and each of the two modules is called exactly once. Anything else is left as it is:
a model that ``torch.fx`` cannot trace (data-dependent control flow, say) is returned
unchanged. The copy is then checked against the model on example images; it agrees up to
float rounding, the same order as the differences between memory layouts or batch sizes,
and a copy that does not agree is discarded with a warning.
The model itself is never modified.
"""
from __future__ import annotations

import copy
import warnings
from collections import Counter

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from uap.forward import eval_mode

__all__ = ["fold_batchnorm", "count_batchnorm"]

#: BatchNorm type → the layer types it can be folded into.
_FOLDABLE = {
    nn.BatchNorm1d: (nn.Conv1d, nn.Linear),
    nn.BatchNorm2d: (nn.Conv2d,),
    nn.BatchNorm3d: (nn.Conv3d,),
}


def count_batchnorm(model: nn.Module) -> int:
    """How many (exactly typed) BatchNorm layers with running statistics ``model`` has."""
    return sum(1 for m in model.modules() if type(m) in _FOLDABLE and m.track_running_stats)


def fold_batchnorm(model: nn.Module, example: torch.Tensor, *, rtol: float = 1e-4) -> nn.Module:
    """An eval-mode copy of ``model`` with its BatchNorm layers folded, or ``model`` itself.

    Args:
        model: a classifier (images → N×K logits) or an encoder (images → features); it is
            copied, never modified.
        example: a few images the copy is checked on (on the model's device).
        rtol: the copy is kept only if its outputs on ``example`` differ from the model's by
            at most ``rtol × max(1, max |output|)``.

    Returns:
        The folded copy (parameters frozen: attacks need gradients w.r.t. the input only), or
        ``model`` when nothing can be folded, the model cannot be traced or copied, or the
        copy does not agree with it.
    """
    if not torch.is_tensor(example) or example.dim() == 0 or example.shape[0] == 0:
        raise ValueError("example must be a non-empty batch of inputs (the folded copy is checked on it)")
    if count_batchnorm(model) == 0:
        return model
    with eval_mode(model):
        folded = _fold(model)
        if folded is None:
            return model
        with torch.no_grad():
            want, got = model(example), folded(example)
    if not (torch.is_tensor(want) and torch.is_tensor(got) and got.shape == want.shape and want.numel()):
        return model  # outputs that cannot be compared: attack the model as it is
    scale = max(1.0, want.abs().max().item())
    if not (got - want).abs().max().item() <= rtol * scale:
        warnings.warn("the batch-norm-folded copy of the model disagrees with the model; attacking the model "
                      "as it is", RuntimeWarning, stacklevel=2)
        return model
    return folded


def _fold(model: nn.Module) -> nn.Module | None:
    """The traced, folded copy, or None when there is nothing to fold or it cannot be made."""
    try:
        root = copy.deepcopy(model)
        gm = fx.GraphModule(root, _InliningTracer().trace(root))
    except Exception:  # untraceable or uncopyable models are attacked as they are
        return None
    gm.eval()
    calls = Counter(node.target for node in gm.graph.nodes if node.op == "call_module")
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        bn, src = gm.get_submodule(node.target), node.args[0]
        if type(bn) not in _FOLDABLE or not bn.track_running_stats or bn.running_mean is None:
            continue
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        layer = gm.get_submodule(src.target)
        if type(layer) not in _FOLDABLE[type(bn)] or calls[src.target] != 1 or calls[node.target] != 1:
            continue
        fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
        _set_submodule(gm, src.target, fuse(layer, bn))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded += 1
    if folded == 0:
        return None
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    for p in gm.parameters():
        p.requires_grad_(False)
    return gm


class _InliningTracer(fx.Tracer):
    """``torch.fx``'s tracer, except that a module held as a plain attribute (not registered as
    a submodule, e.g. the zoo CLIP head's ``encoder``, which shares registered weights) is
    traced through instead of failing; its own submodules must then be registered elsewhere
    in the model, or tracing fails as usual."""

    def call_module(self, m, forward, args, kwargs):
        try:
            self.path_of_module(m)
        except NameError:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
