"""The images an experiment runs on, prepared for its targets, in one call.

Crafting, evaluating, a transfer matrix and a budget sweep all start the same way: choose how
the dataset's images are resized for the targets (:meth:`uap.data.Preprocessing.choose`),
load the crafting images (train split) and the held-out images (test split), and give the
targets the heads the data decides (:func:`uap.heads.attach_heads`). :func:`load_inputs` is
that start, so the command line and a script do exactly the same thing.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from uap import data as datasets
from uap.data import Preprocessing
from uap.heads import attach_heads, check_classes
from uap.images import Images

__all__ = ["Inputs", "load_inputs"]


@dataclass
class Inputs:
    """What :func:`load_inputs` gives.

    Attributes:
        x: the crafting images (train split), or None when none were asked for.
        heldout: ``(images, labels)`` of the held-out split, or None when none were asked for.
        classes: the dataset's class names in label order.
        preprocessing: the resize + crop the images got (None: as they are).
    """

    x: torch.Tensor | Images | None
    heldout: tuple[torch.Tensor | Images, torch.Tensor] | None
    classes: tuple[str, ...]
    preprocessing: Preprocessing | None

    def settings(self) -> dict[str, object] | None:
        """The preprocessing as JSON (what run records and reports store)."""
        return None if self.preprocessing is None else self.preprocessing.settings()


def load_inputs(models: Sequence[nn.Module] | Mapping[str, nn.Module], data: str = "cifar10", *, n_train: int = 0, n_test: int = 0,
                seed: int = 0, root: str | os.PathLike | None = None, image_size: int | None = None,
                resize: int | None = None, test_split: str = "test", stream_test: bool | None = None,
                probe_data: str | None = None, probe_images: int = 1000,
                log: Callable[[str], None] | None = None) -> Inputs:
    """Load ``data`` for ``models`` and attach their data-dependent heads.

    Args:
        models: the targets the images are for (their declared preprocessing is used), or
            ``{name: target}`` (names for the warnings).
        data: ``cifar10`` or ``imagefolder:PATH``.
        n_train: crafting images from the train split (class-balanced for ``seed``); 0: none.
        n_test: held-out images from ``test_split``; 0: none.
        image_size, resize: explicit sizes (see :meth:`Preprocessing.choose`).
        test_split: the split the held-out images come from.
        stream_test: keep the held-out images as uint8 :class:`~uap.images.Images` (floats per
            batch); default: for an imagefolder, whose images may be large.
        probe_data, probe_images, log: see :func:`uap.heads.attach_heads`.

    Models that declare different input sizes share one image set, prepared at the size
    :meth:`Preprocessing.choose` picks (the first model's, or the explicit one); every adapted
    model of a size other than the images' resizes them to its own inside (the resolution rule,
    :func:`uap.adapters.base.fit_input_sizes`).

    Warns (nothing changes) when the train and held-out splits have different classes, and
    when a model's outputs or class names do not fit the data's classes
    (:func:`uap.heads.check_classes`).
    """
    for name, n in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be a number of images ≥ 0, got {n!r}")
    if n_train == 0 and n_test == 0:
        raise ValueError("load_inputs needs crafting (n_train) or held-out (n_test) images")
    named = models
    models = list(models.values()) if isinstance(models, Mapping) else list(models)
    prep = Preprocessing.choose(data, models, image_size, resize)
    if prep is not None:
        _fit_sizes(named, prep.crop, log)
    stream = data.startswith("imagefolder:") if stream_test is None else stream_test
    x = classes = heldout = None
    if n_train:
        x, _, classes = datasets.load(data, "train", n=n_train, seed=seed, root=root, preprocessing=prep)
    if n_test:
        train_classes = classes
        hx, hy, classes = datasets.load(data, test_split, n=n_test, seed=seed, root=root, preprocessing=prep, stream=stream)
        heldout = (hx, hy)
        if train_classes is not None and list(train_classes) != list(classes):
            warnings.warn(f"{data}: the train split's classes ({len(train_classes)}) are not the {test_split} split's "
                          f"({len(classes)}){_difference(train_classes, classes)}; labels mean different classes "
                          "in the two", UserWarning, stacklevel=2)
    attach_heads(models, classes, data=data, probe_data=probe_data, probe_images=probe_images, seed=seed, root=root,
                 preprocessing=prep, heldout_split=test_split if n_test else "test", log=log)
    check_classes(named, classes, (heldout[0] if heldout is not None else x)[:1])
    return Inputs(x=x, heldout=heldout, classes=tuple(classes), preprocessing=prep)


def _fit_sizes(models: Sequence[nn.Module] | Mapping[str, nn.Module], crop: int,
               log: Callable[[str], None] | None) -> None:
    """Apply the resolution rule (:func:`uap.adapters.base.fit_input_sizes`) and say which
    models resize the shared images to their own size."""
    from uap.adapters.base import fit_input_sizes

    items = list(models.items()) if isinstance(models, Mapping) else [(f"model {k}", m) for k, m in enumerate(models)]
    if len({p.crop for _, m in items if (p := Preprocessing.of(m)) is not None}) < 2:
        return  # one declared size (or none): every model takes the images as they are, as always
    changed = {id(m) for m in fit_input_sizes([m for _, m in items], crop)}
    resized = [f"{name} to {m.own_size[0]}" for name, m in items if id(m) in changed]
    if resized and log is not None:
        log(f"images are prepared at {crop}×{crop}; models of another input size resize them inside: {', '.join(resized)}")


def _difference(a: Sequence[str], b: Sequence[str]) -> str:
    """``": only in train: x; only in test: y"`` (or the order, when the sets agree)."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if not only_a and not only_b:
        return ": the same names in another order"
    parts = [f"only in train: {', '.join(only_a[:3])}" if only_a else "", f"only in test: {', '.join(only_b[:3])}" if only_b else ""]
    return ": " + "; ".join(p for p in parts if p)
