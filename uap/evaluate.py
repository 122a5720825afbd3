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

Baselines (``baselines=``, built by :func:`uap.baselines.build_baselines`) are rows like any
other, after the perturbations, and flagged in the report (``Report.baselines``), so a table
shows how far each crafted UAP lies above random noise, chessboards and the best single
Fourier basis image of the same norm.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from uap.forward import DEFAULT_BATCH_SIZE, Inference, Outputs, check_images, encoder_of
from uap.images import Images
from uap.metrics import clean_predictions
from uap.report import Report

__all__ = ["evaluate", "as_named_perturbations", "as_named_models", "clean_outputs", "perturbed_outputs", "Outputs", "ProgressFn"]

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
        key, k = str(name), 2
        while key in out:
            key, k = f"{name}#{k}", k + 1
        out[key] = _tensor_of(p, str(name))
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
    baselines: Mapping[str, PerturbationLike] | None = None,
) -> Report:
    """Evaluate every perturbation on every model over the same images ``x``.

    Args:
        perturbations: ``{name: v}`` or a sequence; each a C×H×W tensor or a ``Perturbation``
            (anything with a tensor ``.v``). Rows of the report, in this order.
        models: ``{name: target}`` or a sequence of targets (images in [0, 1] → logits).
            Columns of the report, in this order.
        x: held-out images in [0, 1], N×C×H×W (not the images the perturbations were crafted on):
            a float tensor, or a :class:`uap.images.Images` set (uint8 pixels turned into floats
            one batch at a time, for image sets too large to hold as floats; same numbers).
        y: true labels (N,), optional; without them the accuracies are NaN.
        batch_size: images per forward pass.
        embeddings: measure clean-vs-perturbed embedding cosine for models with ``.encoder``.
        classes: class names, stored in the report (for readable dominant labels).
        progress: ``progress(done, total, description)`` after every pass over the images.
        meta: free-form metadata stored in the report (data set, seeds, command line …).
        baselines: ``{name: v}`` baseline rows (see :mod:`uap.baselines`), evaluated after the
            perturbations and listed in ``Report.baselines``.

    Returns:
        a :class:`~uap.report.Report` with P×M matrices.
    """
    perts = as_named_perturbations(perturbations)
    baseline_rows = as_named_perturbations(baselines) if baselines else {}
    clash = sorted(set(perts) & set(baseline_rows))
    if clash:
        raise ValueError(f"perturbation name(s) {clash} are also baseline rows; rename the perturbations")
    perts.update(baseline_rows)
    named_models = as_named_models(models)
    check_images(x)
    _check_labels(y, len(x))
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    for name, v in perts.items():
        if tuple(v.shape) != tuple(x.shape[1:]):
            raise ValueError(f"perturbation {name!r} has shape {tuple(v.shape)} but the images are {tuple(x.shape[1:])}: "
                             "a perturbation applies at the resolution it was crafted at (load the images at "
                             "that size, e.g. --image-size); it is never resized, which would change its norm")
    # ``x`` is used as given (not copied): the clean-prediction cache is keyed by its identity.
    y_cpu = None if y is None else y.detach().long().cpu()
    n, P, M = len(x), len(perts), len(named_models)
    shape = (P, M)
    fool, acc, share, cosine = (np.full(shape, math.nan) for _ in range(4))
    dominant = np.full(shape, -1, dtype=np.int64)
    clean_acc = np.full(M, math.nan)
    total, done = M * (P + 1), 0

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
        meta=dict(meta or {}),
        baselines=list(baseline_rows),
    )
