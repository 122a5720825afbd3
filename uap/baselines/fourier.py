"""The ``fourier`` baseline: the best *single Fourier basis perturbation* for one model, found
by a black-box search on crafting images (:func:`fourier_search`).

Tsuzuku & Sato (CVPR 2019) show that single Fourier directions fool CIFAR CNNs. The search
needs a model and images but no gradients: a data-light UAP. It gives one row per model,
``fourier:<model>``, searched on the crafting images — never the held-out ones the row is then
evaluated on.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from uap.baselines.base import (
    Baseline,
    BaselineContext,
    Row,
    _check_budget,
    _check_image_shape,
    _to_norm,
    register_baseline,
)
from uap.forward import DEFAULT_BATCH_SIZE, Inference, check_images
from uap.metrics import clean_predictions
from uap.options import Options
from uap.projection import check_eps, check_norm

__all__ = ["fourier_basis", "fourier_search", "FourierSearch", "FourierOptions", "Fourier", "PHASES"]


#: Phases of the Fourier candidates, in quarter turns: 0, π/2, π, 3π/2 (cos, −sin, −cos, sin).
PHASES = (0, 1, 2, 3)


def _phase_units(h: int, w: int, frequency: tuple[int, int], phase: int) -> torch.Tensor:
    """The angle ``2π(u·i/H + v·j/W) + phase·π/2`` of every pixel, exactly, in units of
    ``2π / (4HW)`` (an integer in ``[0, 4HW)``): no rounding decides a sign."""
    u, v = frequency
    i = torch.arange(h, dtype=torch.int64)[:, None]
    j = torch.arange(w, dtype=torch.int64)[None, :]
    return (4 * (u * i * w + v * j * h) + phase * h * w) % (4 * h * w)


def _basis_pattern(h: int, w: int, frequency: tuple[int, int], phase: int, square: bool) -> torch.Tensor:
    """H×W float64: ``cos`` of the angle, or its sign (+1 on the half-open ``[−π/2, π/2)``)."""
    t = _phase_units(h, w, frequency, phase)
    if square:
        return torch.where((t + h * w) % (4 * h * w) < 2 * h * w, 1.0, -1.0).to(torch.float64)
    return torch.cos(t.to(torch.float64) * (2 * math.pi / (4 * h * w)))


def fourier_basis(
    shape: Sequence[int],
    eps: float,
    p: float = math.inf,
    *,
    frequency: tuple[int, int],
    phase: int = 0,
    channel_signs: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One real 2-D Fourier basis image, scaled to ``‖r‖p = eps`` exactly.

    ``b[i, j] = cos(2π(u·i/H + v·j/W) + phase·π/2)`` for ``frequency = (u, v)`` (cycles per image
    height / width) and ``phase`` in quarter turns (0 = cos, 1 = −sin, 2 = −cos, 3 = sin),
    multiplied by ``channel_signs[c] ∈ {+1, −1}`` on channel ``c`` (default: all +1). For ℓ∞ the
    *sign* of ``b`` is taken (a square wave at ±ε, the whole box, as ℓ∞ UAPs use it); for ℓ2
    and ℓ1 the cosine itself is rescaled. ``(u, v)`` and ``(H − u, W − v)`` with opposite phase
    are the same image.
    """
    c, h, w = _check_image_shape(shape)
    eps, p = _check_budget(eps, p)
    signs = _check_channel_signs(channel_signs, c)
    u, v = (int(f) for f in frequency)
    if phase not in PHASES:
        raise ValueError(f"phase must be a number of quarter turns in {PHASES}, got {phase!r}")
    pattern = _basis_pattern(h, w, (u % h, v % w), phase, square=math.isinf(p))
    if float(pattern.abs().max()) < 1e-6:
        raise ValueError(f"the basis image at frequency {(u, v)} with phase {phase} is zero")
    r = pattern[None] * torch.tensor(signs, dtype=torch.float64)[:, None, None]
    return _to_norm(r, eps, p, dtype)


def _check_channel_signs(signs: Sequence[int] | None, c: int) -> tuple[int, ...]:
    if signs is None:
        return (1,) * c
    signs = tuple(int(s) for s in signs)
    if len(signs) != c or any(s not in (1, -1) for s in signs):
        raise ValueError(f"channel_signs must be {c} values of +1 or -1, got {signs}")
    return signs


def _channel_patterns(c: int) -> list[tuple[int, ...]]:
    """Sign patterns over channels with the first channel positive (their negations are the
    same candidates with the phase turned by π)."""
    if c > 8:
        return [(1,) * c]
    return [(1, *(1 - 2 * ((k >> b) & 1) for b in range(c - 1))) for k in range(2 ** (c - 1))]


def _half_plane(h: int, w: int, max_frequency: int | None) -> list[tuple[int, int]]:
    """Frequencies ``(u, v)`` up to conjugation ``(u, v) ~ (−u, −v)``, lowest first; with
    ``max_frequency``, only those with ``|u|, |v| ≤ max_frequency`` (signed, wrapped)."""
    out = []
    for u in range(h):
        for v in range(w):
            conj = ((-u) % h, (-v) % w)
            if (u, v) > conj:
                continue
            su, sv = min(u, h - u), min(v, w - v)
            if max_frequency is not None and max(su, sv) > max_frequency:
                continue
            out.append((u, v))
    return sorted(out, key=lambda f: (max(min(f[0], h - f[0]), min(f[1], w - f[1])), f))


@dataclass(frozen=True)
class FourierSearch:
    """The best single Fourier basis perturbation for one model (:func:`fourier_search`).

    Attributes:
        v: the perturbation (C×H×W, float32, ``‖v‖p = eps``).
        frequency: ``(u, v)``, cycles per image height and width.
        phase: quarter turns (0 = cos, 1 = −sin, 2 = −cos, 3 = sin).
        channel_signs: +1/−1 per channel.
        fooling_rate: its fooling rate on the crafting images (all of them).
        n_images: crafting images searched on.
        candidates: distinct basis images considered.
        evaluations: perturbed images the model classified during the search (its cost; the
            clean predictions of the crafting images, one pass, come on top).
        rounds: per round, ``{"candidates", "images", "best_fooling_rate"}``.
        seconds: wall-clock time of the search.
    """

    v: torch.Tensor
    frequency: tuple[int, int]
    phase: int
    channel_signs: tuple[int, ...]
    fooling_rate: float
    n_images: int
    candidates: int
    evaluations: int
    rounds: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def info(self) -> dict[str, Any]:
        """JSON-ready description (no tensor)."""
        return {"frequency": list(self.frequency), "phase_quarter_turns": self.phase,
                "channel_signs": list(self.channel_signs), "crafting_fooling_rate": self.fooling_rate,
                "n_images": self.n_images, "candidates": self.candidates, "evaluations": self.evaluations,
                "rounds": self.rounds, "seconds": self.seconds}


def _fooling_rates(run: Inference, x: torch.Tensor, clean: torch.Tensor, vs: torch.Tensor,
                   batch_size: int) -> np.ndarray:
    """Fooling rate of each of the K perturbations ``vs`` (K×C×H×W) on the images ``x``,
    many (perturbation, image) pairs per forward pass."""
    n = len(x)
    per_chunk = max(1, (4 * batch_size) // n)
    rates = []
    for start in range(0, len(vs), per_chunk):
        chunk = vs[start:start + per_chunk]
        xb = (x.unsqueeze(0) + chunk.unsqueeze(1)).clamp_(0.0, 1.0).reshape(-1, *x.shape[1:])
        pred = run(xb, batch_size=batch_size).predictions.view(len(chunk), n)
        rates.append((pred != clean.unsqueeze(0)).double().mean(dim=1))
    return torch.cat(rates).numpy()


def fourier_search(
    model: nn.Module,
    x_craft: torch.Tensor,
    eps: float,
    p: float | int | str = math.inf,
    *,
    seed: int = 0,
    start_images: int = 8,
    eta: int = 4,
    finalists: int = 8,
    max_frequency: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> FourierSearch:
    """The single Fourier basis perturbation with the highest fooling rate on ``x_craft``.

    A black-box, gradient-free search that only ever runs ``model`` on ``clip(x_craft + b)``:
    pass the *crafting* images, never the held-out ones the baseline is then evaluated on.

    Search space: every spatial frequency ``(u, v)`` of an H×W image up to conjugation
    (about HW/2 of them; ``max_frequency`` keeps only ``|u|, |v| ≤`` it, for large images) ×
    4 phases (cos, −sin, −cos, sin), each a grey-level :func:`fourier_basis` image at the
    budget (sign of the cosine for ℓ∞) — exact duplicates (e.g. square waves that coincide)
    are dropped — and then, for the finalists, every per-channel sign pattern
    (``2^(C−1)``: 4 for RGB; the others are their negations, i.e. another phase).

    Search (successive halving, Jamieson & Talwalkar 2016): all candidates are scored on
    ``start_images`` crafting images (a seeded random subset), the best ``1/eta`` are kept and
    scored on ``eta`` times as many (nested subsets), until at most ``finalists`` remain
    scored on every crafting image; their per-channel sign variants are then scored on every
    crafting image too, and the best of all wins (ties: the lowest frequency first). Each
    round costs about ``K · start_images`` model evaluations for K grey candidates (2 000 for
    32×32 images), so the whole search is about ``K · start_images · log_eta(K)`` plus
    ``finalists · (2^(C−1) − 1) · N`` for N crafting images — a few hundred passes over the
    crafting set rather than one per candidate. ``FourierSearch.evaluations`` reports the count.

    Args:
        model: the target (images in [0, 1] → logits).
        x_craft: crafting images in [0, 1], N×C×H×W.
        eps, p: the budget every candidate is scaled to (``‖b‖p = eps``).
        seed: seeds the order in which crafting images enter the rounds.
        start_images, eta, finalists, max_frequency: the search's size (above).
        batch_size: images per forward pass.
    """
    check_images(x_craft, "x_craft")
    eps, p = check_eps(eps), check_norm(p)
    for name, value, low in (("start_images", start_images, 1), ("eta", eta, 2), ("finalists", finalists, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")
    if max_frequency is not None and (not isinstance(max_frequency, int) or max_frequency < 0):
        raise ValueError(f"max_frequency must be an integer ≥ 0 or None, got {max_frequency!r}")
    started = time.perf_counter()
    n, (c, h, w) = len(x_craft), tuple(x_craft.shape[1:])
    x = x_craft.detach().float().cpu()
    clean_all = clean_predictions(model, x_craft, batch_size=batch_size)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    run = Inference(model)
    square = math.isinf(p)

    # grey candidates: (frequency, phase), distinct images only
    grey: list[tuple[tuple[int, int], int]] = []
    patterns: list[torch.Tensor] = []
    seen: set[bytes] = set()
    for freq in _half_plane(h, w, max_frequency):
        for phase in PHASES:
            b = _basis_pattern(h, w, freq, phase, square)
            if float(b.abs().max()) < 1e-6:
                continue  # sin at a frequency where it vanishes on the pixel grid
            key = hashlib.sha1(torch.round(b * 1e9).to(torch.int64).numpy().tobytes()).digest()
            if key in seen:
                continue
            seen.add(key)
            grey.append((freq, phase))
            patterns.append(b)
    if not grey:
        raise ValueError(f"no Fourier candidates for {h}×{w} images with max_frequency={max_frequency}")
    stack = torch.stack(patterns)  # K×H×W, float64
    scale = eps / (torch.linalg.vector_norm(stack.flatten(1), ord=p, dim=1) * c ** (1 / p))  # 1/∞ = 0
    grey_v = (stack * scale[:, None, None]).to(torch.float32)  # one channel's values, ‖·‖p over C×H×W = eps

    alive = np.arange(len(grey))
    images = min(n, start_images)
    rounds, evaluations = [], 0
    while True:
        idx = order[:images]
        vs = grey_v[alive].unsqueeze(1).expand(-1, c, h, w)
        rates = _fooling_rates(run, x[idx], clean_all[idx], vs, batch_size)
        evaluations += len(alive) * images
        rank = np.argsort(-rates, kind="stable")  # candidates are in frequency order: ties → lowest
        rounds.append({"candidates": int(len(alive)), "images": int(images),
                       "best_fooling_rate": float(rates[rank[0]])})
        if images == n or len(alive) <= finalists:
            if images < n:  # few candidates from the start: score the survivors on every image
                images = n
                continue
            keep = rank[:finalists]
            alive, final_rates = alive[keep], rates[keep]
            break
        alive = alive[rank[:max(finalists, math.ceil(len(alive) / eta))]]
        images = min(n, images * eta)

    # per-channel sign variants of the finalists, on every crafting image
    best = (float(final_rates[0]), int(alive[0]), (1,) * c)
    variants = [(int(k), s) for k in alive for s in _channel_patterns(c)[1:]]
    if variants:
        signs = torch.tensor([s for _, s in variants], dtype=torch.float32)[:, :, None, None]
        vs = grey_v[[k for k, _ in variants]].unsqueeze(1) * signs
        rates = _fooling_rates(run, x[order], clean_all[order], vs, batch_size)
        evaluations += len(variants) * n
        rounds.append({"candidates": len(variants), "images": n, "best_fooling_rate": float(rates.max())})
        pool = [(float(r), k, (1,) * c) for r, k in zip(final_rates, alive)] + \
               [(float(r), k, s) for r, (k, s) in zip(rates, variants)]
        best = max(pool, key=lambda t: (t[0], -t[1]))  # highest rate; ties: lowest frequency
    rate, k, signs_best = best
    freq, phase = grey[k]
    v = fourier_basis((c, h, w), eps, p, frequency=freq, phase=phase, channel_signs=signs_best)
    return FourierSearch(v=v, frequency=freq, phase=phase, channel_signs=tuple(signs_best), fooling_rate=rate,
                         n_images=n, candidates=len(grey) + len(variants), evaluations=evaluations,
                         rounds=rounds, seconds=time.perf_counter() - started)


@dataclass(frozen=True)
class FourierOptions(Options):
    """The size of the search (see :func:`fourier_search`)."""

    start_images: int = 8
    eta: int = 4
    finalists: int = 8
    max_frequency: int | None = None


@register_baseline()
class Fourier(Baseline):
    """The best single Fourier basis image for each model, searched on the crafting images."""

    name = "fourier"
    needs = frozenset({"models", "x_craft"})
    Options = FourierOptions

    def make(self, variant: str, ctx: BaselineContext) -> Row:
        found = fourier_search(ctx.model, ctx.x_craft, ctx.eps, ctx.p, seed=ctx.seed, batch_size=ctx.batch_size,
                               **self.options.to_dict())
        return Row(found.v, found.info())
