"""``Images``: a set of images kept as bytes and turned into float tensors one batch at a time.

Why: at ImageNet resolution a float32 tensor of every held-out image is large (5 000 images of
224×224 are 3 GB) while the engine only ever needs one batch of them at a time. ``Images``
holds the decoded pixels as ``uint8`` (N×H×W×C, a quarter of the float size, or a memory map
of the decoded-image cache on disk, which costs no memory until read) plus a row index, and
gives float tensors in ``[0, 1]`` (N×C×H×W) when indexed. Everything that measures a
perturbation over a set of images — :class:`uap.forward.Inference`, :func:`uap.fooling_rate`,
:func:`uap.accuracy`, :func:`uap.evaluate`, :func:`uap.transfer_matrix` — takes an ``Images``
wherever it takes a tensor, and gets the same numbers: ``images[a:b]`` is exactly
``torch.from_numpy(pixels[a:b]).permute(0, 3, 1, 2).float() / 255``, the conversion
:func:`uap.data.load` applies to the whole set.

Crafting (which indexes random minibatches with gradients, many times) takes tensors:
:meth:`Images.tensor` materialises the set when it is small enough to craft on.
"""
from __future__ import annotations

from typing import Iterator, Sequence, Union

import numpy as np
import torch

__all__ = ["Images", "as_rows", "is_images", "to_float"]

Index = Union[int, slice, Sequence[int], np.ndarray, torch.Tensor]


class Images:
    """Images in ``[0, 1]`` backed by ``uint8`` pixels; indexing gives float32 N×C×H×W tensors.

    Args:
        pixels: ``N×H×W×C`` ``uint8`` array (an ``np.memmap`` is read only where indexed).
        rows: which rows of ``pixels`` make up this set, in order (default: all). Selecting a
            subset (:meth:`select`) only narrows ``rows``; no pixels are copied.

    The object mimics the parts of a tensor that the measuring code reads: ``len``,
    ``shape`` (N, C, H, W), ``dim()``, ``dtype`` (float32, what indexing returns) and
    ``device`` (CPU).
    """

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, pixels: np.ndarray, rows: np.ndarray | None = None) -> None:
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 4:
            raise ValueError("Images needs an N×H×W×C uint8 array of pixels")
        self.pixels = pixels
        self.rows = np.arange(len(pixels)) if rows is None else np.asarray(rows, dtype=np.int64)
        if self.rows.ndim != 1 or (len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= len(pixels))):
            raise ValueError(f"rows must index the {len(pixels)} images")

    # -- the tensor-like surface --------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        _, h, w, c = self.pixels.shape
        return torch.Size((len(self.rows), c, h, w))

    def dim(self) -> int:
        return 4

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def __getitem__(self, index: Index) -> torch.Tensor:
        """The float32 images at ``index`` (an int gives one C×H×W image)."""
        if isinstance(index, (int, np.integer)):
            return self[[int(index)]][0]
        picked = self.rows[_numpy_index(index)]
        if picked.ndim == 0:
            picked = picked.reshape(1)
        if len(picked) and np.all(np.diff(picked) == 1):  # a run of rows: one slice of the array
            block = self.pixels[int(picked[0]):int(picked[-1]) + 1]
        else:
            block = self.pixels[np.sort(picked)][np.argsort(np.argsort(picked))] if len(picked) else self.pixels[:0]
        return to_float(np.ascontiguousarray(block))

    def __repr__(self) -> str:
        n, c, h, w = self.shape
        return f"Images({n}×{c}×{h}×{w}, uint8)"

    # -- sets and whole tensors ---------------------------------------------------------
    def select(self, index: Index) -> Images:
        """The images at ``index`` as another ``Images`` over the same pixels (nothing copied)."""
        return Images(self.pixels, self.rows[_numpy_index(index)].reshape(-1))

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Consecutive float batches of ``batch_size`` images."""
        for start in range(0, len(self), batch_size):
            yield self[start:start + batch_size]

    def tensor(self) -> torch.Tensor:
        """Every image as one float32 tensor (what :func:`uap.data.load` returns)."""
        return self[:]

    def uint8(self) -> np.ndarray:
        """This set's pixels (N×H×W×C ``uint8``, a copy)."""
        return np.ascontiguousarray(self.pixels[self.rows])


def to_float(pixels: np.ndarray) -> torch.Tensor:
    """``N×H×W×C`` uint8 → ``N×C×H×W`` float32 in [0, 1] (the one conversion of decoded images)."""
    if not pixels.flags.writeable:  # a read-only memory map: torch wants an array it may own
        pixels = np.array(pixels)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def is_images(x: object) -> bool:
    """Whether ``x`` is an :class:`Images` set (not a tensor)."""
    return isinstance(x, Images)


def as_rows(x: torch.Tensor | Images, index: Index) -> torch.Tensor | Images:
    """``x[index]`` that keeps an :class:`Images` set lazy (a selection, not floats)."""
    return x.select(index) if isinstance(x, Images) else x[index]


def _numpy_index(index: Index):
    if isinstance(index, slice):
        return index
    if torch.is_tensor(index):
        index = index.detach().cpu().numpy()
    index = np.asarray(index)
    if index.dtype == bool:
        return np.flatnonzero(index)
    if not np.issubdtype(index.dtype, np.integer):
        raise TypeError(f"Images are indexed by ints, slices or integer arrays, got {index.dtype}")
    return index.astype(np.int64)
