"""A word-level tokenizer whose vocabulary is built from the caption corpus.

Why not CLIP's byte-pair encoder: it needs a downloaded merge table, and on CIFAR-10's caption
corpus (a few dozen distinct words) a word vocabulary is exact, tiny and keeps sequences short,
which is what makes the text tower cheap enough to train on a CPU. The vocabulary travels with
the checkpoint (as a JSON list), so nothing is downloaded at load time.

Layout of an encoded caption, as in CLIP (Radford et al. 2021, §2.4): ``<sot> w1 … wk <eot>``
followed by ``<pad>`` up to ``context_length``. The text transformer is causal, so the padding
after ``<eot>`` never influences the ``<eot>`` feature that becomes the sentence embedding.
Words never seen while building the vocabulary (e.g. in held-out zero-shot prompts) map to
``<unk>``; training replaces a few known words by ``<unk>`` so that token is not untrained.

Examples:
    >>> tok = WordTokenizer.build(["a photo of a cat.", "a red dog."])
    >>> ids, eot = tok.encode(["a photo of a dog."])
    >>> tok.decode(ids[0])
    'a photo of a dog .'
    >>> int(eot[0])
    7
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Sequence

import torch

__all__ = ["WordTokenizer", "split_words", "PAD", "SOT", "EOT", "UNK"]

PAD, SOT, EOT, UNK = "<pad>", "<sot>", "<eot>", "<unk>"
_SPECIALS = (PAD, SOT, EOT, UNK)
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*|[^\sa-z0-9]")


def split_words(text: str) -> list[str]:
    """Lower-case ``text`` and split it into words and single punctuation marks."""
    return _WORD.findall(text.lower())


class WordTokenizer:
    """Map captions to fixed-length id tensors and back.

    Args:
        vocab: the words, in id order, *after* the four special tokens (which always take ids
            0–3: ``<pad>``, ``<sot>``, ``<eot>``, ``<unk>``). Duplicates are rejected.
        context_length: length of every encoded sequence, ``<sot>`` and ``<eot>`` included.
    """

    def __init__(self, vocab: Sequence[str], context_length: int = 32):
        words = [w for w in vocab if w not in _SPECIALS]
        if len(set(words)) != len(words):
            raise ValueError("vocabulary has duplicate words")
        if context_length < 3:
            raise ValueError(f"context_length must be >= 3 (<sot>, a word, <eot>), got {context_length}")
        self.itos: list[str] = list(_SPECIALS) + words
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self.context_length = int(context_length)

    pad_id, sot_id, eot_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, texts: Iterable[str], context_length: int = 32, min_count: int = 1) -> "WordTokenizer":
        """A tokenizer whose vocabulary is every word seen ``>= min_count`` times in ``texts``
        (sorted by decreasing frequency, then alphabetically, so the ids are deterministic)."""
        counts = Counter(w for t in texts for w in split_words(t))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(words, context_length)

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, texts: Sequence[str] | str, truncate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``texts`` as ``(ids, eot_index)``: ``ids`` is int64 N×context_length, and
        ``eot_index[i]`` the position of the ``<eot>`` token in row ``i``.

        A caption longer than ``context_length - 2`` words raises ``ValueError`` unless
        ``truncate`` is true, in which case its tail is dropped (``<eot>`` is kept).
        """
        if isinstance(texts, str):
            texts = [texts]
        n, length = len(texts), self.context_length
        ids = torch.full((n, length), self.pad_id, dtype=torch.int64)
        eot = torch.empty(n, dtype=torch.int64)
        for i, text in enumerate(texts):
            row = [self.stoi.get(w, self.unk_id) for w in split_words(text)]
            if len(row) > length - 2:
                if not truncate:
                    raise ValueError(f"caption has {len(row)} words but context_length={length} allows "
                                     f"{length - 2}: {text!r} (pass truncate=True to cut it)")
                row = row[: length - 2]
            ids[i, 0] = self.sot_id
            ids[i, 1:len(row) + 1] = torch.tensor(row, dtype=torch.int64)
            ids[i, len(row) + 1] = self.eot_id
            eot[i] = len(row) + 1
        return ids, eot

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """The words of one encoded row between ``<sot>`` and ``<eot>``, space-separated."""
        out = []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            if i == self.eot_id:
                break
            if i in (self.sot_id, self.pad_id):
                continue
            out.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return " ".join(out)

    def unknown_words(self, texts: Iterable[str]) -> list[str]:
        """The distinct words of ``texts`` that are not in the vocabulary (sorted)."""
        return sorted({w for t in texts for w in split_words(t) if w not in self.stoi})

    def to_json(self) -> dict:
        """Metadata that rebuilds this tokenizer with :meth:`from_json` (stored in model cards)."""
        return {"kind": "word", "context_length": self.context_length, "vocab": self.itos[len(_SPECIALS):]}

    @classmethod
    def from_json(cls, meta: dict) -> "WordTokenizer":
        if meta.get("kind") != "word":
            raise ValueError(f"unknown tokenizer kind {meta.get('kind')!r} (expected 'word')")
        return cls(meta["vocab"], int(meta["context_length"]))


def mask_words(ids: torch.Tensor, eot_index: torch.Tensor, p: float, keep: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each word token (not ``<sot>``/``<eot>``/``<pad>``) by ``<unk>`` with probability
    ``p`` — word dropout, so that ``<unk>`` (what unseen prompt words become) gets trained.
    ``keep`` is an optional bool mask (same shape as ``ids``) of tokens never replaced."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"word dropout probability must be in [0, 1), got {p}")
    positions = torch.arange(ids.shape[1], device=ids.device)
    is_word = (positions > 0) & (positions < eot_index[:, None])
    drop = torch.rand(ids.shape, generator=generator, device=ids.device) < p
    drop &= is_word
    if keep is not None:
        drop &= ~keep
    return ids.masked_fill(drop, WordTokenizer.unk_id)
