"""Baselines: perturbations with no per-image optimisation, at the norm of the UAPs they are compared with.

A universal perturbation's fooling rate means little on its own: what matters is how far
above the *cheapest* perturbation of the same size it lies. This module holds those cheap
perturbations, each a function of the image shape, the budget (ε, p) and a seed:

- ``random`` — :func:`random_perturbation`, the random row of Moosavi-Dezfooli et al.
  (CVPR 2017, §3): uniform random signs × ε for ℓ∞ (every pixel at ±ε), a uniformly random
  direction on the sphere for ℓ2 and ℓ1.
- ``gaussian`` — :func:`gaussian_perturbation`: i.i.d. Gaussian noise rescaled to ``‖r‖p = ε``
  (for ℓ∞ most pixels sit well inside the box, so it carries less energy than ``random``).
- ``chessboard1/2/4/8`` — :func:`chessboard`: a ±1 chessboard with square cells of 1, 2, 4 or
  8 pixels, the same sign on every channel, scaled to the budget (±ε for ℓ∞); and
  ``chessboard1n/2n/4n/8n``, the same boards negated (a model need not respond to a pattern
  and its negation alike, and the sign is arbitrary). A fixed,
  data-free, gradient-free pattern; high-frequency patterns like these fool CIFAR CNNs far
  more than random noise of the same norm.
- ``fourier`` — :func:`fourier_search`: the best *single Fourier basis perturbation* for one
  model, found by a black-box search on crafting images (Tsuzuku & Sato, CVPR 2019, show
  that single Fourier directions fool CIFAR CNNs). It needs a model and images but no
  gradients: a data-light UAP.

:func:`build_baselines` makes the rows for a list of names (:func:`parse_baselines` reads
``"random,chessboard,fourier"``); :func:`uap.evaluate` and :func:`uap.transfer_matrix` show
them as rows flagged as baselines in the :class:`~uap.report.Report`.

Every draw is seeded with its own ``torch.Generator``, so it is reproducible and leaves the
global RNG alone.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from uap.forward import DEFAULT_BATCH_SIZE, Inference, check_images
from uap.metrics import clean_predictions
from uap.projection import check_eps, check_norm, norm_name

__all__ = [
    "strongest_baseline",
    "random_perturbation",
    "gaussian_perturbation",
    "chessboard",
    "fourier_basis",
    "fourier_search",
    "FourierSearch",
    "BASELINES",
    "CHESSBOARD_CELLS",
    "CHESSBOARDS",
    "parse_baselines",
    "build_baselines",
    "Baselines",
    "fourier_row",
    "fourier_source",
]

#: Cell sizes (pixels) of the ``chessboard<k>`` baselines.
CHESSBOARD_CELLS = (1, 2, 4, 8)

#: The chessboards: ``chessboard<k>`` (top-left cell +ε) and ``chessboard<k>n`` (its negation,
#: top-left −ε). The sign is arbitrary and a model's response to the two is not symmetric, so
#: both are rows.
CHESSBOARDS = tuple(f"chessboard{c}{s}" for c in CHESSBOARD_CELLS for s in ("", "n"))

#: Every named baseline, in the order rows are shown.
BASELINES = ("random", "gaussian", *CHESSBOARDS, "fourier")

#: Names that stand for several baselines.
_GROUPS = {"chessboard": CHESSBOARDS, "all": BASELINES, "none": ()}


# ---------------------------------------------------------------------------- checks

def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"shape must be non-empty with positive sizes, got {shape}")
    return shape


def _check_image_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = _check_shape(shape)
    if len(shape) != 3:
        raise ValueError(f"shape must be one image's C×H×W, got {shape}")
    return shape  # type: ignore[return-value]


def _check_budget(eps: float, p: float | int | str) -> tuple[float, float]:
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    try:
        return float(eps), check_norm(p)
    except ValueError:
        raise ValueError(f"p must be inf, 2 or 1, got {p!r}") from None


def _to_norm(r: torch.Tensor, eps: float, p: float, dtype: torch.dtype) -> torch.Tensor:
    """``r`` (float64, non-zero) rescaled to ``‖r‖p = eps``."""
    return (r * (eps / torch.linalg.vector_norm(r.flatten(), ord=p))).to(dtype)


# ---------------------------------------------------------------------------- noise

def random_perturbation(
    shape: Sequence[int],
    eps: float,
    p: float = math.inf,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A random perturbation of ``shape`` (e.g. C×H×W) with ``‖r‖p = eps`` exactly.

    - ``p = ∞``: uniform random signs × ε. Every pixel sits at ±ε, so the noise uses the whole
      box — the "saturated" shape ℓ∞ UAPs take after projection, which makes it the fair,
      strongest-at-that-norm random comparison (uniform noise in ``[-ε, ε]`` has the same
      ‖·‖∞ but far less energy).
    - ``p = 2``: a Gaussian vector rescaled to ``‖r‖2 = ε`` — a uniformly random direction.
    - ``p = 1``: i.i.d. Laplace entries rescaled to ``‖r‖1 = ε`` — uniform on the ℓ1 sphere
      (normalised exponentials are uniform on the simplex; random signs spread them over
      every orthant).

    Args:
        shape: shape of the perturbation, usually one image's ``C×H×W``.
        eps: the norm to match (the crafted UAPs' budget ε), > 0.
        p: ``inf``, ``2`` or ``1``.
        seed: seeds a private generator; same seed, same noise.
        dtype: floating dtype of the result.

    Examples:
        >>> r = random_perturbation((3, 32, 32), 8 / 255, float("inf"), seed=0)
        >>> bool(torch.all(r.abs() == torch.tensor(8 / 255)))
        True
    """
    shape = _check_shape(shape)
    eps, p = _check_budget(eps, p)
    gen = torch.Generator().manual_seed(int(seed))
    if p == math.inf:
        signs = torch.randint(0, 2, shape, generator=gen, dtype=torch.int64) * 2 - 1
        return signs.to(dtype) * eps
    if p == 2:
        return _to_norm(torch.randn(shape, generator=gen, dtype=torch.float64), eps, p, dtype)
    u = torch.rand(shape, generator=gen, dtype=torch.float64).clamp_min(1e-300)
    signs = torch.randint(0, 2, shape, generator=gen, dtype=torch.int64) * 2 - 1
    return _to_norm(-torch.log(u) * signs, eps, p, dtype)  # Laplace(0, 1)


def gaussian_perturbation(
    shape: Sequence[int],
    eps: float,
    p: float = math.inf,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """I.i.d. standard Gaussian noise of ``shape`` rescaled to ``‖r‖p = eps`` exactly.

    For ℓ2 this is the same distribution as :func:`random_perturbation`; for ℓ∞ and ℓ1 it is
    the "natural noise" comparison (a Gaussian scaled so its largest pixel, or its ℓ1 mass,
    meets the budget), weaker than random signs at the same ‖·‖∞.
    """
    shape = _check_shape(shape)
    eps, p = _check_budget(eps, p)
    gen = torch.Generator().manual_seed(int(seed))
    return _to_norm(torch.randn(shape, generator=gen, dtype=torch.float64), eps, p, dtype)


# ---------------------------------------------------------------------------- chessboard

def chessboard(
    shape: Sequence[int],
    eps: float,
    p: float = math.inf,
    *,
    cell: int = 2,
    sign: int = 1,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A ±1 chessboard of ``cell``×``cell``-pixel squares, scaled to ``‖r‖p = eps`` exactly.

    ``r[c, h, w] ∝ sign · (−1)^(⌊h / cell⌋ + ⌊w / cell⌋)``: the top-left cell has the sign
    ``sign`` (+1 or −1) and every channel carries the same sign (a grey-level pattern). Every pixel has the same magnitude,
    so for ℓ∞ it is ±ε and for ℓ2 / ℓ1 it is ``ε / √(CHW)`` / ``ε / (CHW)``. A cell of 1 is the
    highest spatial frequency an image can carry; the pattern needs no data, no model and no
    seed.
    """
    c, h, w = _check_image_shape(shape)
    eps, p = _check_budget(eps, p)
    if isinstance(cell, bool) or not isinstance(cell, int) or cell <= 0:
        raise ValueError(f"cell must be a positive number of pixels, got {cell!r}")
    if sign not in (1, -1) or isinstance(sign, bool):
        raise ValueError(f"sign must be 1 or -1, got {sign!r}")
    rows = torch.arange(h) // cell
    cols = torch.arange(w) // cell
    board = sign * (1.0 - 2.0 * ((rows[:, None] + cols[None, :]) % 2).to(torch.float64))
    return _to_norm(board.expand(c, h, w), eps, p, dtype)


# ---------------------------------------------------------------------------- Fourier basis

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


# ---------------------------------------------------------------------------- registry

def parse_baselines(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """Baseline names from ``"random,chessboard,fourier"`` (or a sequence of names), in
    :data:`BASELINES` order, without repeats. ``chessboard`` means all four cell sizes in both signs,
    ``all`` every baseline, ``none`` (or an empty string) none."""
    if spec is None:
        return ()
    items = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    chosen: set[str] = set()
    for item in items:
        if not item:
            continue
        if item in _GROUPS:
            chosen.update(_GROUPS[item])
        elif item in BASELINES:
            chosen.add(item)
        else:
            raise ValueError(f"unknown baseline {item!r}: use {', '.join((*BASELINES, *_GROUPS))}")
    return tuple(b for b in BASELINES if b in chosen)


#: The data-free baselines: ``make(shape, eps, p, seed)``.
_DATA_FREE: dict[str, Callable[[tuple[int, ...], float, float, int], torch.Tensor]] = {
    "random": lambda shape, eps, p, seed: random_perturbation(shape, eps, p, seed=seed),
    "gaussian": lambda shape, eps, p, seed: gaussian_perturbation(shape, eps, p, seed=seed),
    **{f"chessboard{c}{s}": (lambda shape, eps, p, seed, c=c, sign=sign: chessboard(shape, eps, p, cell=c, sign=sign))
       for c in CHESSBOARD_CELLS for s, sign in (("", 1), ("n", -1))},
}


def fourier_row(model_name: str) -> str:
    """Row name of the Fourier baseline searched on ``model_name``."""
    return f"fourier:{model_name}"


def fourier_source(row: str) -> str | None:
    """The model a ``fourier:<model>`` row was searched on (``None`` for any other row)."""
    return row.split(":", 1)[1] if row.startswith("fourier:") else None


@dataclass
class Baselines:
    """Baseline rows: ``perturbations`` ``{row name: v}`` and ``info`` ``{row name: facts}``
    (kind, norm, and for a Fourier row the model it was searched on and the search record)."""

    perturbations: dict[str, torch.Tensor]
    info: dict[str, dict[str, Any]]


def build_baselines(
    names: str | Sequence[str] | None,
    shape: Sequence[int],
    eps: float,
    p: float | int | str = math.inf,
    *,
    seed: int = 0,
    models: Mapping[str, nn.Module] | None = None,
    x_craft: torch.Tensor | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    search: Mapping[str, Any] | None = None,
    callback: Callable[[str, dict], None] | None = None,
) -> Baselines:
    """The baseline perturbations ``names`` for images of ``shape``, each with ``‖v‖p = eps``.

    ``fourier`` gives one row per model in ``models``, ``fourier:<model>``, searched with
    :func:`fourier_search` on ``x_craft`` — the crafting images, never the held-out ones.
    ``search`` passes options to :func:`fourier_search`; ``callback("fourier", {"model": …})``
    is called before each search.
    """
    chosen = parse_baselines(names)
    shape = _check_image_shape(shape)
    eps, p = _check_budget(eps, p)
    perts: dict[str, torch.Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    for name in chosen:
        if name != "fourier":
            perts[name] = _DATA_FREE[name](shape, eps, p, seed)
            info[name] = {"kind": name, "eps": eps, "norm": norm_name(p), "seed": seed}
            continue
        if not models or x_craft is None:
            raise ValueError("the fourier baseline needs models to search on and crafting images (x_craft)")
        if tuple(x_craft.shape[1:]) != shape:
            raise ValueError(f"x_craft images are {tuple(x_craft.shape[1:])}, the baselines are for {shape}")
        for mname, model in models.items():
            if callback is not None:
                callback("fourier", {"model": mname})
            found = fourier_search(model, x_craft, eps, p, seed=seed, batch_size=batch_size, **dict(search or {}))
            row = fourier_row(mname)
            perts[row] = found.v
            info[row] = {"kind": "fourier", "model": mname, "eps": eps, "norm": norm_name(p), "seed": seed,
                         **found.info()}
    return Baselines(perturbations=perts, info=info)


#: The baselines that need no data and no search (what a crafting run is compared with).
DATA_FREE = tuple(_DATA_FREE)


def strongest_baseline(
    model: nn.Module,
    x: torch.Tensor,
    eps: float,
    p: float | int | str = math.inf,
    *,
    y: torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, Any]:
    """The data-free baseline (random, Gaussian, chessboards) that fools ``model`` most on ``x``
    at ``‖v‖p = eps``: ``{"name", "fooling_rate", "accuracy" (None without y), "rates"}``, with
    ``rates`` the fooling rate of every one of them. What a crafted UAP should be read against."""
    from uap.metrics import accuracy, fooling_rate

    check_images(x)
    built = build_baselines(DATA_FREE, x.shape[1:], eps, p, seed=seed)
    rates = {name: fooling_rate(model, x, v, batch_size=batch_size) for name, v in built.perturbations.items()}
    name = max(rates, key=rates.get)
    acc = None if y is None else accuracy(model, x, y, built.perturbations[name], batch_size=batch_size)
    return {"name": name, "fooling_rate": rates[name], "accuracy": acc, "rates": rates}

