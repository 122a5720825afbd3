"""GD-UAP: a universal perturbation that needs no data, by over-firing every convolutional layer.

Mopuri, Ganeshan & Babu, "Generalizable data-free objective for crafting universal
adversarial perturbations" (TPAMI 2018): a perturbation that makes the activations of every
convolutional layer as large as possible corrupts the features any later layer reads, so it
fools the model without ever asking what the images are. The objective is the sum over the
model's convolutional layers ``l`` of the log of the activation's ℓ2 norm, at an input made
from ``v`` and a *prior* of what images look like::

    J(v) = mean_{x ∈ B} Σ_l log ‖f_l(clip(x + v, 0, 1))‖₂

    prior "none":  x = ½·1, the mid-grey image — ``v`` alone on the centre of the data range
                   (the paper's input δ in a mean-subtracted space is the mean image plus δ);
    prior "range": x ~ clip(N(½, ¼²), 0, 1) per pixel, fresh images each step — samples that
                   know only the data's range [0, 1] (the paper's range prior);
    prior "data":  x = the crafting images, minibatches of the pass's visiting order.

``v`` climbs ``J`` by projected steepest ascent (:mod:`uap.methods.ascent`: the sign of the
gradient for ℓ∞, its ℓ2 direction otherwise, step ``step_size·ε·decay^(k−1)`` in pass ``k``,
the exact projection onto the ball after every step), one update per minibatch. The log makes
every layer count alike, whatever its scale; the mean over images keeps the objective a sum of
per-image terms, so minibatches split and torch.distributed shares them as for ``sgd``.

Without crafting images (``uap.craft(model, None, …)``, prior none or range) there is no
fooling rate on X for the stop rule: each pass is ``steps`` updates and the run makes all
``max_passes`` passes (the held-out rates, when given, are still measured after each). With
crafting images the stop rule reads their fooling rate as for any method, whatever the prior.
The layers are every ``nn.Conv1d/2d/3d`` of the model as attacked (batch norm folded into them
unless ``fold_batchnorm=False``). Against several models the objective is their mean.

Options (``method_options``): ``prior`` (``"none"``, ``"range"`` or ``"data"``), ``steps`` (64:
updates per pass with prior none or range), ``batch_size`` (32: range samples or crafting images
per update), ``step_size`` (0.1, a fraction of ε) and ``decay`` (0.7 per pass).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from uap.methods.algorithm1 import INNER_CALLS
from uap.methods.ascent import AscentOptions, projected_ascent_pass, step_length
from uap.methods.base import CraftContext, Method, register_method
from uap.options import require

__all__ = ["GDUAP", "GDUAPOptions", "PRIORS", "conv_layers", "log_activation_objective", "range_prior"]

#: The priors of the inputs ``v`` is added to.
PRIORS = ("none", "range", "data")

#: Mean and standard deviation of the range prior's pixels (±2σ spans the data range [0, 1]).
RANGE_MEAN, RANGE_STD = 0.5, 0.25


@dataclass(frozen=True)
class GDUAPOptions(AscentOptions):
    """:class:`~uap.methods.ascent.AscentOptions` plus the ``prior`` and the ``steps`` of a pass
    that reads no crafting images."""

    prior: str = "none"
    steps: int = 64

    def check(self) -> None:
        super().check()
        require(self.prior in PRIORS, f"unknown prior {self.prior!r}: use one of {', '.join(PRIORS)}")
        require(self.steps >= 1, f"steps must be an integer ≥ 1, got {self.steps!r}")


def conv_layers(model: nn.Module) -> list[nn.Module]:
    """Every convolution of ``model`` (``nn.Conv1d/2d/3d`` and their transposes), in module order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]


@contextlib.contextmanager
def _recording(layers: list[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """The outputs of ``layers`` during the ``with`` block, in the order they are computed."""
    outputs: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for layer in layers]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def log_activation_objective(model: nn.Module, x_adv: torch.Tensor, layers: list[nn.Module] | None = None
                             ) -> torch.Tensor:
    """``mean_i Σ_l log ‖f_l(x_adv_i)‖₂`` over the convolutions ``layers`` of ``model`` (default:
    all of them, :func:`conv_layers`); ``ValueError`` for a model without one."""
    layers = conv_layers(model) if layers is None else layers
    if not layers:
        raise ValueError("method 'gd-uap' maximises the activations of convolutional layers; the model has none")
    with _recording(layers) as outputs:
        model(x_adv)
    tiny = torch.finfo(x_adv.dtype).tiny
    total = x_adv.new_zeros(x_adv.shape[0])
    for a in outputs:  # ½ log ‖a‖² : finite gradient at a = 0
        total = total + 0.5 * a.flatten(1).pow(2).sum(dim=1).clamp_min(tiny).log()
    return total.mean()


def range_prior(n: int, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype = torch.float32
                ) -> torch.Tensor:
    """``n`` images of the range prior: i.i.d. ``clip(N(½, ¼²), 0, 1)`` pixels from ``generator``."""
    z = torch.randn((n, *shape), generator=generator, dtype=torch.float32)
    return (RANGE_MEAN + RANGE_STD * z).clamp_(0.0, 1.0).to(dtype)


@register_method()
class GDUAP(Method):
    """GD-UAP (module docstring): data-free with prior none or range, against one model or several."""

    name = "gd-uap"
    Options = GDUAPOptions
    ensembles = True
    counters = (INNER_CALLS,)  # Algorithm 1's column, always 0: every built-in method's records have the same keys

    @property
    def needs_data(self) -> bool:  # type: ignore[override]
        return self.options.prior == "data"

    def describe(self, device: torch.device) -> dict:
        return {"gd_uap": {"prior": self.options.prior, "range_prior": [RANGE_MEAN, RANGE_STD],
                           "steps_per_pass": None if self.needs_data else self.options.steps}}

    def run_pass(self, ctx: CraftContext) -> None:
        opts = self.options
        members = [(model, conv_layers(model)) for model in (m.classifier for m in ctx.members())]

        def objective(x_adv: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, None]:
            values = [log_activation_objective(model, x_adv, layers) for model, layers in members]
            return (values[0] if len(values) == 1 else torch.stack(values).mean()), None

        step = step_length(ctx, step_size=opts.step_size, decay=opts.decay)
        if opts.prior == "data":
            projected_ascent_pass(ctx, objective, batch_size=opts.batch_size, step=step)
            return
        shape = tuple(ctx.v.shape)
        n = 1 if opts.prior == "none" else opts.batch_size
        ctx.total = opts.steps * n
        for _ in range(opts.steps):  # one update per step on fresh prior images, shared over ranks like data
            if opts.prior == "none":
                x = torch.full((1, *shape), RANGE_MEAN, dtype=ctx.v.dtype, device=ctx.v.device)
            else:
                x = range_prior(n, shape, ctx.generator, ctx.v.dtype).to(ctx.v.device)
            step_ctx = dataclasses.replace(ctx, x=x, clean=torch.zeros(n, dtype=torch.long, device=x.device),
                                           order=torch.arange(n, device=x.device), callback=None, _layout=None)
            projected_ascent_pass(step_ctx, objective, batch_size=n, step=step)
            ctx.v, ctx.visited, ctx.updates = step_ctx.v, step_ctx.visited, step_ctx.updates
            ctx.progress()
