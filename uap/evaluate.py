"""``evaluate``: every perturbation on every model, on the same held-out images.

This is the measurement behind the UAP paper's transfer table (Moosavi-Dezfooli et al.,
CVPR 2017, Table 2): a perturbation ``v`` is applied to held-out images as ``clip(x + v, 0, 1)``
and each model is scored on

- **fooling rate** — share of images whose predicted label changes, measured against the
  model's own clean predictions (not the true labels: a UAP "fools" a model when it changes
  its decision, whether or not that decision was right);
- **clean accuracy** and **accuracy under the perturbation** (when labels are given);
- **dominant-label share** — share of perturbed images sent to the single most common label
  (the paper's §4 observation that UAPs push most inputs to a few dominant labels);
- **embedding cosine** — for models that expose ``.encoder`` (images in [0, 1] → features),
  the mean cosine similarity between clean and perturbed embeddings: how far the perturbation
  moves the representation, independently of any classifier head.

Cost: clean predictions come from the engine's shared cache
(:func:`uap.metrics.clean_predictions`), so they are computed once per (model, image tensor)
and reused for every perturbation — and across calls. Clean embeddings are computed once per
model per call. Each (perturbation, model) pair then costs one batched forward pass of
:class:`uap.forward.Inference`, which also captures the perturbed embedding in that pass when
the model's ``forward`` calls its own ``.encoder`` (a probe on top of an encoder).

Baselines (``baselines=``: names, built here at the perturbations' budget by
:func:`baselines_at_budget`, or rows built by :func:`uap.baselines.build_baselines`) are rows
like any other, after the perturbations, and flagged in the report (``Report.baselines``), so a
table shows how far each crafted UAP lies above random noise, chessboards and the best single
Fourier basis image of the same norm.

:func:`load_perturbations` reads saved perturbations (files, stems or ``uap craft`` run
folders) under unique row names, for evaluating them; :func:`reuse_normalisation` gives a model
spec the normalisation a perturbation was crafted with on that same spec.

A clean accuracy no better than chance is warned about (:func:`check_clean_accuracy`): a model
given the wrong normalisation, or data with other classes, makes every number meaningless.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from uap.baselines import Baselines, build_baselines, parse_baselines, row_names
from uap.forward import DEFAULT_BATCH_SIZE, Inference, Outputs, check_images, encoder_of
from uap.images import Images
from uap.metrics import clean_predictions
from uap.projection import check_eps, check_norm, lp_norm, norm_name
from uap.report import Report
from uap.saved import unique_name

__all__ = ["evaluate", "baselines_at_budget", "as_named_perturbations", "as_named_models", "clean_outputs",
           "perturbed_outputs", "Outputs", "ProgressFn", "check_clean_accuracy"]

#: ``progress(done, total, description)`` — called after each pass over the images (one clean
#: pass per model, then one per perturbation and model).
ProgressFn = Callable[[int, int, str], None]
PerturbationLike = Union[torch.Tensor, Any]  # a tensor or anything with a tensor ``.v`` (Perturbation)


# ---------------------------------------------------------------------------- inputs

def _tensor_of(p: PerturbationLike, name: str) -> torch.Tensor:
    v = p.v if hasattr(p, "v") else p
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"perturbation {name!r} is a {type(p).__name__}, expected a tensor or a Perturbation")
    if v.dim() == 4 and v.shape[0] == 1:
        v = v[0]
    if v.dim() != 3:
        raise ValueError(f"perturbation {name!r} must be C×H×W, got shape {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        raise ValueError(f"perturbation {name!r} has NaN or infinite values")
    return v.detach().float().cpu()


def _default_name(p: Any, i: int) -> str:
    """A row name for an unnamed perturbation: the model it was crafted on, else ``v<i>``."""
    model = getattr(p, "model", None)
    return str(model) if isinstance(model, str) and model and model != "unknown" else f"v{i}"


def as_named_perturbations(
    perturbations: Mapping[str, PerturbationLike] | Sequence[PerturbationLike],
) -> dict[str, torch.Tensor]:
    """``{name: v}`` with each ``v`` a float C×H×W CPU tensor.

    A sequence is named after each perturbation's source model (``Perturbation.model``) or ``v0, v1 …``;
    repeated names get a ``#k`` suffix so no row is silently dropped.
    """
    items = list(perturbations.items()) if isinstance(perturbations, Mapping) else [
        (_default_name(p, i), p) for i, p in enumerate(perturbations)
    ]
    if not items:
        raise ValueError("no perturbations to evaluate")
    out: dict[str, torch.Tensor] = {}
    for name, p in items:
        out[unique_name(str(name), out)] = _tensor_of(p, str(name))
    return out


def as_named_models(models: Mapping[str, nn.Module] | Sequence[nn.Module]) -> dict[str, nn.Module]:
    """``{name: model}``; a sequence is named ``m0, m1 …``."""
    items = list(models.items()) if isinstance(models, Mapping) else [(f"m{i}", m) for i, m in enumerate(models)]
    if not items:
        raise ValueError("no models to evaluate on")
    for name, m in items:
        if not isinstance(m, nn.Module):
            raise ValueError(f"model {name!r} is a {type(m).__name__}, expected an nn.Module (a target classifier)")
    return {str(k): m for k, m in items}


def _crafted_norm(p: PerturbationLike) -> float | None:
    """The norm a perturbation was crafted in (a ``Perturbation``'s ``p``); None for a tensor."""
    value = None if isinstance(p, torch.Tensor) else getattr(p, "p", None)
    return None if value is None else check_norm(value)


#: How a caller gets baselines when the perturbations give no budget.
_EXPLICIT_BUDGET = ("give the baselines an explicit budget (eps and norm; --eps and --norm on the command line) "
                    "or ask for none")


def baselines_at_budget(
    names: str | Sequence[str] | None,
    shape: Sequence[int],
    perturbations: Mapping[str, PerturbationLike] | Sequence[PerturbationLike] | None = None,
    *,
    eps: float | None = None,
    norm: float | int | str | None = None,
    models: Mapping[str, nn.Module] | None = None,
    x_craft: torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    search: Mapping[str, Any] | None = None,
    callback: Callable[[str, dict], None] | None = None,
) -> Baselines:
    """The baseline rows ``names`` at the budget of the ``perturbations`` they are compared with.

    The budget is the largest ℓp norm of the perturbations, in the norm they were crafted in
    (every ``Perturbation``'s ``p`` must agree; plain tensors need ``norm``) — ε when they
    saturate their budget. ``norm`` alone measures them in that norm; ``eps`` (with ``norm``,
    default: the perturbations' norm, else ∞) is an explicit budget and wins, and is the only
    way when there is no perturbation or every one has norm 0. A requested baseline is never
    dropped: where there is no budget, or the perturbations were crafted in different norms,
    it is a ``ValueError`` saying what to give.

    ``models``, ``x_craft``, ``seed``, ``batch_size``, ``search`` and ``callback`` go to
    :func:`uap.baselines.build_baselines` (per-model baselines are made for every model in
    ``models``; ``x_craft`` must be crafting images, never held-out ones). The result's
    :meth:`~uap.baselines.Baselines.meta` is what a report records about the rows
    (``baseline_norm``, ``baseline_p``, ``baselines``, ``n_craft``).
    """
    chosen = parse_baselines(names)
    if not chosen:
        return Baselines(perturbations={}, info={})
    raw = [] if perturbations is None else list(perturbations.values() if isinstance(perturbations, Mapping)
                                                 else perturbations)
    for name, v in (as_named_perturbations(perturbations) if raw else {}).items():  # a norm at another size means nothing
        _check_resolution(name, v, shape)
    crafted = sorted({n for n in map(_crafted_norm, raw) if n is not None})
    mixed = ", ".join(norm_name(n) for n in crafted)
    if eps is not None:
        if norm is None and len(crafted) > 1:
            raise ValueError(f"the perturbations were crafted in different norms ({mixed}): give the norm of the "
                             f"baselines' budget eps")
        p = check_norm(norm) if norm is not None else (crafted[0] if crafted else math.inf)
        budget = check_eps(eps, p)
    else:
        if norm is None and len(crafted) > 1:
            raise ValueError(f"the perturbations were crafted in different norms ({mixed}), so they set no one "
                             f"budget for the baselines: evaluate them separately, or {_EXPLICIT_BUDGET}")
        if not raw:
            raise ValueError(f"no perturbations to take the baselines' budget from: {_EXPLICIT_BUDGET}")
        if norm is None and not crafted:
            raise ValueError("the perturbations are plain tensors, so the norm to measure their size in is "
                             f"unknown: give norm, or {_EXPLICIT_BUDGET}")
        p = check_norm(norm) if norm is not None else crafted[0]
        budget = max(float(lp_norm(v, p)) for v in as_named_perturbations(perturbations).values())
        if not budget > 0:
            raise ValueError(f"every perturbation has ℓ{norm_name(p)} norm 0, so there is no budget to put the "
                             f"baselines at: {_EXPLICIT_BUDGET}")
    return build_baselines(chosen, shape, budget, p, seed=seed, models=models, x_craft=x_craft,
                           batch_size=batch_size, search=search, callback=callback)


def _check_labels(y: torch.Tensor | None, n: int) -> None:
    if y is not None and (not isinstance(y, torch.Tensor) or y.dim() != 1 or len(y) != n):
        raise ValueError(f"y must hold one label per image ({n}), got shape {tuple(getattr(y, 'shape', ()))}")


# ---------------------------------------------------------------------------- forward passes

def clean_outputs(
    model: nn.Module,
    x: torch.Tensor,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    embeddings: bool = True,
    name: str = "model",
) -> Outputs:
    """Clean predictions and (for models with ``.encoder``) clean embeddings of ``model`` on ``x``.

    The labels come from the engine's shared cache (:func:`uap.metrics.clean_predictions`,
    keyed by model and tensor identity), so a model that already labelled this very ``x``
    tensor — e.g. while crafting measured its held-out fooling rate — is not run again.
    The embeddings take one batched pass of ``model.encoder``.
    """
    preds = clean_predictions(model, x, batch_size=batch_size)
    if not embeddings or encoder_of(model) is None:
        return Outputs(preds, None)
    return Outputs(preds, Inference(model, embeddings=True, name=name).embeddings(x, batch_size=batch_size))


def perturbed_outputs(run: Inference, x: torch.Tensor, v: torch.Tensor,
                      batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[Outputs, int]:
    """Labels (and embeddings) on ``clip(x + v, 0, 1)`` in one batched pass of ``run``, and the
    number of classes. ``run`` is the model's :class:`~uap.forward.Inference`, kept across
    perturbations so its checks (encoder hook, memory layout) are made once per model."""
    out = run(x, v, batch_size=batch_size)
    return out, out.num_classes


# ---------------------------------------------------------------------------- evaluate

def evaluate(
    perturbations: Mapping[str, PerturbationLike] | Sequence[PerturbationLike],
    models: Mapping[str, nn.Module] | Sequence[nn.Module],
    x: torch.Tensor | Images,
    y: torch.Tensor | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    embeddings: bool = True,
    classes: Sequence[str] | None = None,
    progress: ProgressFn | None = None,
    meta: Mapping[str, Any] | None = None,
    baselines: str | Sequence[str] | Baselines | Mapping[str, PerturbationLike] | None = None,
    eps: float | None = None,
    norm: float | int | str | None = None,
    x_craft: torch.Tensor | None = None,
    seed: int = 0,
) -> Report:
    """Evaluate every perturbation on every model over the same images ``x``.

    Args:
        perturbations: ``{name: v}`` or a sequence; each a C×H×W tensor or a ``Perturbation``
            (anything with a tensor ``.v``). Rows of the report, in this order; may be empty
            when ``baselines`` gives rows.
        models: ``{name: target}`` or a sequence of targets (images in [0, 1] → logits).
            Columns of the report, in this order.
        x: held-out images in [0, 1], N×C×H×W (not the images the perturbations were crafted on):
            a float tensor, or a :class:`uap.images.Images` set (uint8 pixels turned into floats
            one batch at a time, for image sets too large to hold as floats; same numbers).
        y: true labels (N,), optional; without them the accuracies are NaN.
        batch_size: images per forward pass.
        embeddings: measure clean-vs-perturbed embedding cosine for models with ``.encoder``.
        classes: class names, stored in the report (for readable dominant labels).
        progress: ``progress(done, total, description)`` after every pass over the images (and
            with ``done = 0`` before each per-model baseline row is made, e.g. a Fourier search).
        meta: free-form metadata stored in the report (data set, seeds, command line …).
        baselines: baseline rows (see :mod:`uap.baselines`), evaluated after the perturbations
            and listed in ``Report.baselines``: names (``"random,chessboard"``, ``"data-free"``,
            ``"all"`` …), built here by :func:`baselines_at_budget` at the perturbations' budget
            (per-model rows for every model in ``models``), with their facts in the report's
            meta; or rows already built, a :class:`uap.baselines.Baselines` (its facts go to the
            meta too) or ``{name: v}``.
        eps, norm: an explicit budget for the baselines built from names (see
            :func:`baselines_at_budget`); without ``eps``, the perturbations' largest norm.
        x_craft: crafting images for the baselines that search on them (never ``x``).
        seed: seeds the baselines built from names.

    Returns:
        a :class:`~uap.report.Report` with P×M matrices.
    """
    built = baselines if isinstance(baselines, Baselines) else None
    chosen: tuple[str, ...] = ()
    baseline_rows: dict[str, torch.Tensor] = {}
    if baselines is None or isinstance(baselines, (Baselines, Mapping)):
        if eps is not None or norm is not None:
            raise ValueError("eps and norm are the budget of the baselines evaluate builds from names "
                             "(baselines='random,…'); rows already built have theirs")
        given = built.perturbations if built is not None else baselines
        baseline_rows = as_named_perturbations(given) if given else {}
    else:
        chosen = parse_baselines(baselines)
    perts = as_named_perturbations(perturbations) if len(perturbations) or not (baseline_rows or chosen) else {}
    named_models = as_named_models(models)
    check_images(x)
    _check_labels(y, len(x))
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    rows = list(baseline_rows) or row_names(chosen, list(named_models))
    clash = sorted(set(perts) & set(rows))
    if clash:
        raise ValueError(f"perturbation name(s) {clash} are also baseline rows; rename the perturbations")
    for name, v in {**perts, **baseline_rows}.items():
        _check_resolution(name, v, x.shape[1:])
    # ``x`` is used as given (not copied): the clean-prediction cache is keyed by its identity.
    y_cpu = None if y is None else y.detach().long().cpu()
    n, P, M = len(x), len(perts) + len(rows), len(named_models)
    total, done = M * (P + 1), 0

    def announce(_event: str, info: dict) -> None:
        if progress is not None:
            progress(0, total, f"{info['baseline']} baseline on {info['model']}")

    if chosen:
        if x_craft is not None and x_craft is x:
            raise ValueError("x_craft must be crafting images, not the held-out images x the rows are measured on")
        built = baselines_at_budget(chosen, x.shape[1:], perturbations, eps=eps, norm=norm, models=named_models,
                                    x_craft=x_craft, seed=seed, batch_size=batch_size, callback=announce)
        baseline_rows = built.perturbations
    perts.update(baseline_rows)
    shape = (P, M)
    fool, acc, share, cosine = (np.full(shape, math.nan) for _ in range(4))
    dominant = np.full(shape, -1, dtype=np.int64)
    clean_acc = np.full(M, math.nan)

    def advance(desc: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, desc)

    for j, (mname, model) in enumerate(named_models.items()):
        clean = clean_outputs(model, x, batch_size=batch_size, embeddings=embeddings, name=mname)
        advance(f"{mname}: clean")
        if y_cpu is not None:
            clean_acc[j] = (clean.predictions == y_cpu).double().mean().item()
            check_clean_accuracy(clean_acc[j], len(classes) if classes else len(torch.unique(y_cpu)), n, mname)
        run = Inference(model, embeddings=embeddings, name=mname)
        for i, (pname, v) in enumerate(perts.items()):
            out, num_classes = perturbed_outputs(run, x, v, batch_size)
            pred = out.predictions
            fool[i, j] = (pred != clean.predictions).double().mean().item()
            if y_cpu is not None:
                acc[i, j] = (pred == y_cpu).double().mean().item()
            counts = torch.bincount(pred, minlength=num_classes)
            dominant[i, j] = int(counts.argmax())
            share[i, j] = counts.max().item() / n
            if out.embeddings is not None and clean.embeddings is not None:
                cosine[i, j] = F.cosine_similarity(clean.embeddings.double(), out.embeddings.double(),
                                                   dim=1, eps=1e-12).mean().item()
            advance(f"{pname} → {mname}")

    return Report(
        perturbations=list(perts),
        models=list(named_models),
        fooling_rate=fool,
        accuracy=acc,
        dominant_label=dominant,
        dominant_share=share,
        embedding_cosine=cosine,
        clean_accuracy=clean_acc,
        norm_linf=[float(v.abs().max()) for v in perts.values()],
        norm_l2=[float(v.norm()) for v in perts.values()],
        n_images=n,
        classes=list(classes) if classes is not None else None,
        meta={**(meta or {}), **(built.meta() if built is not None else {})},
        baselines=list(baseline_rows),
    )


def check_clean_accuracy(accuracy: float, n_classes: int, n_images: int, model: str = "the model") -> bool:
    """Warn when a clean accuracy is no better than chance: at most ``1 / n_classes`` plus two
    standard errors of a chance-level model on ``n_images`` labelled images. Such a model is
    not classifying these images (wrong normalisation, mean/std on the 0–255 scale, data with
    other classes), so fooling rates measured on it mean nothing. Returns whether it warned."""
    if n_classes < 2 or n_images < 1 or not math.isfinite(accuracy):
        return False
    chance = 1.0 / n_classes
    if accuracy > chance + 2 * math.sqrt(chance * (1 - chance) / n_images):
        return False
    warnings.warn(f"{model}: clean accuracy {100 * accuracy:.1f} % is no better than chance ({100 * chance:.1f} % "
                  f"for {n_classes} classes): is the normalisation right? (mean/std are on the [0, 1] scale) "
                  "and are these the model's classes?", UserWarning, stacklevel=2)
    return True


def _check_resolution(name: str, v: torch.Tensor, shape: Sequence[int]) -> None:
    if tuple(v.shape) != tuple(shape):
        raise ValueError(f"perturbation {name!r} has shape {tuple(v.shape)} but the images are {tuple(shape)}: "
                         "a perturbation applies at the resolution it was crafted at (load the images at "
                         "that size, e.g. --image-size); it is never resized, which would change its norm")
