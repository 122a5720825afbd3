"""Heads that depend on the data a target is measured on.

Some targets cannot classify until they know the data: a zero-shot model (``open_clip:``)
needs the class names to build its text classifier, and a backbone from a ``hub:`` repository
needs a probe fitted on labelled images. Such a target says so by a method:

- ``use_classes(classes)`` — called with the data's class names;
- ``fit_probe(x, y, classes, seed=...)`` — called with labelled images to fit its head on.

:func:`attach_heads` gives every target what it asks for. Probes are fitted on the *train*
split — the crafting side of the split rule — so a probe never sees a held-out image.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from uap.data import Preprocessing, balanced_subset, load_split

__all__ = ["attach_heads", "needs_probe", "check_classes"]


def needs_probe(model: nn.Module) -> bool:
    """Whether ``model`` fits a probe on labelled images before it classifies."""
    return callable(getattr(model, "fit_probe", None))


def attach_heads(models: Sequence[nn.Module], classes: Sequence[str], *, data: str, probe_data: str | None = None,
                 probe_images: int = 1000, seed: int = 0, root: str | os.PathLike | None = None,
                 preprocessing: Preprocessing | None = None, heldout_split: str = "test",
                 log: Callable[[str], None] | None = None) -> int:
    """Give each of ``models`` the heads the data decides (module docstring).

    Args:
        models: the targets; those without ``use_classes``/``fit_probe`` are left alone.
        classes: the class names of the images the models will be measured on.
        data: the dataset those images come from.
        probe_data: the labelled dataset probes are fitted on (its train split; default ``data``).
        probe_images: how many of its images (class-balanced, deterministic for ``seed``).
        preprocessing: how the probe images are resized and cropped (that of the measured images).
        heldout_split: the split the models will be measured on; ``"train"`` with probes fitted
            on the same dataset would fit them on the measured images, and is refused.
        log: called with one line before the probes are fitted.

    Returns the number of probes fitted. Raises ``ValueError`` for a probe that would see the
    measured images, a probe dataset with other classes, or ``probe_images`` < 1.
    """
    for m in models:
        if callable(getattr(m, "use_classes", None)):
            m.use_classes(list(classes))
    needing = [m for m in models if needs_probe(m)]
    if not needing:
        return 0
    source = probe_data or data
    if source == data and heldout_split == "train":
        raise ValueError("--split train: hub models fit their probe on the train split; evaluate on --split test, "
                         "or fit it elsewhere with --probe-data")
    if isinstance(probe_images, bool) or not isinstance(probe_images, int) or probe_images <= 0:
        raise ValueError(f"--probe-images must be > 0, got {probe_images}")
    split = load_split(source, "train", root=root, preprocessing=preprocessing, stream=True)
    if tuple(split.classes) != tuple(classes):
        raise ValueError(f"--probe-data {source} has other classes than --data {data}; the probe must predict "
                         "the classes it is measured on")
    picked = balanced_subset(split.y.numpy(), min(probe_images, len(split.y)), seed)
    if log is not None:
        log(f"fitting the probe of {len(needing)} hub model(s) on {len(picked)} {source} train images")
    for m in needing:
        m.fit_probe(split.x.select(picked), split.y[torch.as_tensor(picked, dtype=torch.long)], split.classes, seed=seed)
    return len(needing)


def check_classes(models: Sequence[nn.Module] | Mapping[str, nn.Module], classes: Sequence[str],
                  example: torch.Tensor) -> list[str]:
    """Warn (one line each) when a model cannot be classifying the data's ``classes``: its
    number of logits on ``example`` (one image or a few) is not the number of classes, or the
    class names it declares (``model.classes``, e.g. from its weights' metadata) are not the
    data's — fewer than half of them the same name at the same label, compared without case
    or punctuation, so that two spellings of one label set (``crane`` / ``crane bird``) pass. Accuracies against the data's labels are then meaningless, though every number is
    still computed as asked; nothing is changed. A model whose forward pass fails here is left
    to fail where it is used. Returns the warnings' texts."""
    from uap.forward import eval_mode, model_device

    named = models.items() if isinstance(models, Mapping) else ((type(m).__name__, m) for m in models)
    said = []
    for name, model in named:
        declared = getattr(model, "classes", None)
        try:
            with torch.no_grad(), eval_mode(model):
                logits = model(example[:1].to(model_device(model)))
        except Exception:  # not this check's to report
            logits = None
        if torch.is_tensor(logits) and logits.dim() == 2 and logits.shape[1] != len(classes):
            said.append(f"{name} gives {logits.shape[1]} logits but the data has {len(classes)} classes: the data's "
                        "labels are not this model's classes, so its accuracies are meaningless")
        elif declared and not _same_names(declared, classes):
            said.append(f"{name}'s classes ({_shown(declared)}) are not the data's ({_shown(classes)}): "
                        "its accuracies against these labels are meaningless")
    for line in said:
        warnings.warn(line, UserWarning, stacklevel=2)
    return said


def _same_names(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether two class lists name the same labels: as long, and at least half the names alike."""
    def key(name: object) -> str:
        return "".join(ch for ch in str(name).lower() if ch.isalnum())

    return len(a) == len(b) and 2 * sum(key(x) == key(y) for x, y in zip(a, b)) >= len(a)


def _shown(names: Sequence[str], n: int = 3) -> str:
    names = [str(c) for c in names]
    return ", ".join(names[:n]) + (f" … {len(names)} in all" if len(names) > n else "")
