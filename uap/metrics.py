"""Metrics of a universal perturbation: fooling rate, accuracy, dominant label.

The *fooling rate* of Moosavi-Dezfooli et al. (CVPR 2017, §3) is measured against the
model's **clean predictions**, not the labels::

    Err(X_v) = mean_i 1[k̂(clip(x_i + v)) ≠ k̂(x_i)]

(ART's ``UniversalPerturbation`` mixes this with the error rate vs labels; here they are two
separate functions: :func:`fooling_rate` and :func:`accuracy`.)

Clean predictions are cached so that evaluating a perturbation costs one forward pass per
image. :class:`CleanPredictions` is the cache; :func:`clean_predictions` reads the shared
default instance. An entry is keyed by the *identity* of the model and its parameters'
version counters (every in-place update of a parameter or buffer bumps ``tensor._version``,
so training the model invalidates it; entries die with the model, weak references) and by
the *content* of the data (:func:`uap.fingerprint.tensor_fingerprint`): images edited in
place — also through ``.data`` or a NumPy view, which no version counter sees — are new
images, and an equal copy of the same images is a hit. Other modules (``uap.evaluate``)
should call :func:`clean_predictions` rather than re-running the model.

Every function takes the images as a float tensor or as a :class:`uap.images.Images` set
(uint8 pixels, converted per batch: the same numbers without holding every image as floats).
Every function here runs the model through :class:`uap.forward.Inference` (``batch_size``
images per forward pass, eval mode, no autograd, the model's device, ``N×C`` logits checked).
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from uap.fingerprint import tensor_fingerprint
from uap.forward import DEFAULT_BATCH_SIZE, Inference, check_images, check_perturbation
from uap.images import Images, is_images

__all__ = [
    "CleanPredictions",
    "clean_predictions",
    "predict",
    "fooling_rate",
    "accuracy",
    "dominant_label",
]

def predict(
    model: nn.Module,
    x: torch.Tensor,
    v: torch.Tensor | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> torch.Tensor:
    """Predicted labels ``k̂(clip(x + v, 0, 1))`` (or ``k̂(x)`` without ``v``), int64 on CPU."""
    return Inference(model)(x, v, batch_size=batch_size).predictions


class CleanPredictions:
    """Cache of clean predictions ``k̂(x)``, keyed by model identity + versions and data content.

    ``cache.get(model, x)`` returns the cached labels when the model's parameters and buffers
    did not change (their version counters) and ``x`` holds the same bytes (its fingerprint)
    as when they were computed, otherwise computes them with :func:`predict` and stores them.
    Entries are dropped when the model is garbage-collected. Use one shared instance
    (:data:`DEFAULT_CACHE`, via :func:`clean_predictions`) so that crafting and evaluation
    share work.
    """

    def __init__(self) -> None:
        self._store: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _model_stamp(model: nn.Module) -> tuple:
        tensors = list(model.parameters()) + list(model.buffers())
        return (len(tensors), sum(t._version for t in tensors), tuple(id(t) for t in tensors[:4]))

    @staticmethod
    def _data_key(x: torch.Tensor | Images) -> tuple:
        if is_images(x):  # read-only pixels: identity and selection suffice
            return (id(x), id(x.pixels), tuple(x.shape), len(x.rows))
        return (tensor_fingerprint(x), str(x.device))

    def get(self, model: nn.Module, x: torch.Tensor, *, batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
        """Clean predicted labels of ``model`` on ``x`` (int64, CPU), cached."""
        check_images(x)
        entries = self._store.setdefault(model, {})
        key = self._data_key(x)
        stamp = self._model_stamp(model)
        hit = entries.get(key)
        if hit is not None and hit[0] == stamp:
            self.hits += 1
            return hit[1].clone()  # a caller that edits the labels must not edit the cache
        self.misses += 1
        labels = predict(model, x, batch_size=batch_size)
        entries[key] = (stamp, labels.clone())
        return labels

    def clear(self) -> None:
        """Forget every entry."""
        self._store = weakref.WeakKeyDictionary()


DEFAULT_CACHE = CleanPredictions()


def clean_predictions(model: nn.Module, x: torch.Tensor, *, batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """``k̂(x)`` for every image, from the shared :class:`CleanPredictions` cache."""
    return DEFAULT_CACHE.get(model, x, batch_size=batch_size)


def fooling_rate(
    model: nn.Module,
    x: torch.Tensor,
    v: torch.Tensor,
    *,
    clean: torch.Tensor | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> float:
    """Fraction of images whose prediction changes: ``mean 1[k̂(clip(x+v)) ≠ k̂(x)]``.

    ``clean`` may pass precomputed clean labels; otherwise they come from the cache, so a
    repeated evaluation costs one forward pass per image.
    """
    check_images(x)
    v = check_perturbation(v, x)
    if clean is None:
        clean = clean_predictions(model, x, batch_size=batch_size)
    elif clean.shape != (x.shape[0],):
        raise ValueError(f"clean has shape {tuple(clean.shape)}, expected ({x.shape[0]},)")
    adv = predict(model, x, v, batch_size=batch_size)
    return (adv != clean.cpu()).sum().item() / len(adv)  # exact count, one division in float64


def accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    v: torch.Tensor | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> float:
    """Top-1 accuracy against labels ``y``, on clean images or under perturbation ``v``."""
    check_images(x)
    if not torch.is_tensor(y) or y.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(getattr(y, 'shape', ()))}")
    pred = clean_predictions(model, x, batch_size=batch_size) if v is None else predict(model, x, v, batch_size=batch_size)
    return (pred == y.cpu()).sum().item() / len(pred)


def dominant_label(
    model: nn.Module, x: torch.Tensor, v: torch.Tensor, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> tuple[int, float]:
    """The most frequent label under ``v`` and the fraction of images that get it.

    Universal perturbations tend to push most images to a few dominant labels (CVPR 2017, §4).
    """
    pred = predict(model, x, v, batch_size=batch_size)
    counts = torch.bincount(pred)
    label = int(counts.argmax())
    return label, counts[label].item() / pred.numel()
