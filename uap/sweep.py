"""Budget curves: held-out fooling rate against the crafting budget, for several methods.

The analogue of Fig. 6/7 of Moosavi-Dezfooli et al. (CVPR 2017). Four one-at-a-time axes
around a base point ``(n_base images, eps_base, passes)``:

- ``n_images``: the number of crafting images |X| (nested random subsets of ``x``, so a
  larger X contains every smaller one), at ``eps_base``;
- ``eps``: the radius ε, with ``n_base`` images;
- ``passes``: the held-out rate after each pass of the base run (its per-pass history; a
  run that met its stop rule early keeps its last value);
- ``seconds``: the same passes against the base run's wall-clock time (cumulative seconds
  after each pass, its evaluations included), so methods compare at equal time and
  ``crossings[method]["seconds"]`` is the time each takes to beat the strongest baseline.

Every point is one :func:`uap.craft_run` in its own folder under ``out_dir/points/``, so a
sweep that is stopped resumes where it was (finished points are reused, an interrupted one
continues from its checkpoint), and changing one axis recrafts only the new points. Each run
also measures the strongest data-free baseline (random, Gaussian, chessboards) at its ε on
the same held-out images (:func:`uap.baselines.strongest_baseline`): the curve a method must
rise above. :attr:`Sweep.crossings` names, per method and axis, the smallest budget at which
the method's held-out rate reaches that baseline (None: it never does on the grid).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from uap.atomic import atomic_write
from uap.forward import check_images
from uap.methods import make_method
from uap.projection import check_eps, check_norm, norm_name

__all__ = ["Sweep", "SweepPoint", "sweep", "sweep_points"]

AXES = ("n_images", "eps", "passes", "seconds")


@dataclass(frozen=True)
class SweepPoint:
    """One crafting run of a sweep: ``method`` on the first ``n_images`` images at ``eps``."""

    method: str
    n_images: int
    eps: float

    @property
    def slug(self) -> str:
        """The point's folder name under ``points/``."""
        method = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.method)
        return f"{method}-n{self.n_images}-eps{self.eps:.6g}"


def sweep_points(methods: Sequence[str], n_images: Sequence[int], eps: Sequence[float], *, n_base: int,
                 eps_base: float, n_limits: Mapping[str, int] | None = None) -> list[SweepPoint]:
    """The distinct runs of a sweep, each method's base point first (it gives the passes axis);
    ``n_limits`` caps the |X| axis of some methods (``{"deepfool": 1000}``)."""
    points: list[SweepPoint] = []
    limits = dict(n_limits or {})
    for method in methods:
        counts = [n for n in n_images if n <= limits.get(method, n)]
        for point in ([SweepPoint(method, n_base, eps_base)] + [SweepPoint(method, n, eps_base) for n in counts]
                      + [SweepPoint(method, n_base, e) for e in eps]):
            if point not in points:
                points.append(point)
    return points


@dataclass
class Sweep:
    """The curves of a sweep.

    Attributes:
        rows: one dict per curve point: ``axis`` (``n_images`` / ``eps`` / ``passes``), ``value``,
            ``method``, ``n_images``, ``eps``, ``passes``, ``fooling_rate`` (on X),
            ``heldout_fooling_rate``, ``heldout_accuracy``, ``seconds`` (the run's time).
        baselines: ``{eps: {"name", "heldout_fooling_rate", "heldout_accuracy", "heldout_fooling_rates"}}``,
            the strongest data-free baseline at each ε on the held-out images.
        settings: what the sweep was asked (model, norm, axes, base point, passes …).
    """

    rows: list[dict[str, Any]]
    baselines: dict[float, dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)

    def curve(self, method: str, axis: str) -> list[tuple[float, float]]:
        """``[(value, held-out fooling rate)]`` of ``method`` along ``axis``, sorted by value."""
        return sorted((r["value"], r["heldout_fooling_rate"]) for r in self.rows  # None: a pass not measured
                      if r["method"] == method and r["axis"] == axis and r["heldout_fooling_rate"] is not None)

    def baseline_at(self, eps: float) -> float:
        """The strongest baseline's held-out fooling rate at ``eps``."""
        return float(self.baselines[_eps_key(eps)]["heldout_fooling_rate"])

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.rows))

    @property
    def crossings(self) -> dict[str, dict[str, float | None]]:
        """``{method: {axis: smallest value whose held-out rate ≥ the strongest baseline's at
        that point's ε, or None}}``."""
        out: dict[str, dict[str, float | None]] = {}
        for method in self.methods:
            out[method] = {}
            for axis in AXES:
                rows = sorted((r for r in self.rows if r["method"] == method and r["axis"] == axis),
                              key=lambda r: r["value"])
                hit = next((r["value"] for r in rows if r["heldout_fooling_rate"] is not None
                            and r["heldout_fooling_rate"] >= self.baseline_at(r["eps"])), None)
                out[method][axis] = hit
        return out

    def to_json(self) -> dict[str, Any]:
        return {"settings": self.settings, "rows": self.rows,
                "baselines": {f"{e:.6g}": b for e, b in self.baselines.items()}, "crossings": self.crossings}

    def to_csv(self) -> str:
        """The rows with the strongest baseline at each row's ε beside them."""
        buf = io.StringIO()
        fields = ["axis", "value", "method", "n_images", "eps", "passes", "fooling_rate", "heldout_fooling_rate",
                  "heldout_accuracy", "seconds", "baseline", "baseline_heldout_fooling_rate"]
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            base = self.baselines[_eps_key(r["eps"])]
            writer.writerow({**{k: r[k] for k in fields[:10]}, "baseline": base["name"],
                             "baseline_heldout_fooling_rate": base["heldout_fooling_rate"]})
        return buf.getvalue()

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write ``sweep.json``, ``sweep.csv`` and ``sweep.png`` (atomically) into ``out_dir``."""
        from uap.plots import plot_sweep

        out = Path(out_dir)
        return {"json": atomic_write(out / "sweep.json", json.dumps(self.to_json(), indent=2) + "\n"),
                "csv": atomic_write(out / "sweep.csv", self.to_csv()),
                "png": plot_sweep(self, out / "sweep.png")}


def _eps_key(eps: float) -> float:
    return float(f"{eps:.9g}")


def _check_counts(values: Sequence[int], name: str) -> list[int]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be positive integers, got {v!r}")
        out.append(v)
    return sorted(set(out))


def sweep(
    model: nn.Module,
    x: torch.Tensor,
    heldout: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    methods: Sequence[str] = ("deepfool", "deepfool-batched", "sgd", "feature"),
    n_images: Sequence[int] = (100, 300, 1000, 3000, 10000),
    eps: Sequence[float] = (2 / 255, 4 / 255, 6 / 255, 8 / 255, 10 / 255, 12 / 255),
    n_base: int = 1000,
    eps_base: float = 10 / 255,
    norm: float | int | str = math.inf,
    passes: int = 5,
    delta: float = 0.2,
    seed: int = 0,
    model_id: str | None = None,
    data: str | None = None,
    settings: Mapping[str, Any] | None = None,
    resume: bool = True,
    n_limits: Mapping[str, int] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    **craft_kwargs: Any,
) -> Sweep:
    """Craft every point of the sweep (see the module docstring) and return its curves.

    Args:
        model: the target classifier.
        x: the crafting pool; a point with ``n`` images uses the first ``n`` of a ``seed``-fixed
            permutation of ``x`` (nested subsets). Needs ``len(x) ≥ max(n_images, n_base)``.
        heldout: images (or ``(images, labels)``) every point is measured on; never used to craft.
        out_dir: the sweep's folder: ``points/<method>-n<N>-eps<ε>/`` per run, then
            ``sweep.json``/``.csv``/``.png`` (:meth:`Sweep.save`).
        methods: registered crafting methods.
        n_images, eps: the values of the two axes; ``n_base``/``eps_base`` the base point.
        norm, passes, delta, seed: as in :func:`uap.craft` (``passes`` is ``max_passes``).
        resume: continue an interrupted point from its checkpoint (finished points are always reused).
        n_limits: ``{method: largest |X|}`` for methods too slow for the whole |X| axis (their
            curve stops there); each limit must be at least ``n_base``.
        callback: called with ``{"event": "point", "index", "total", "point", "summary"}`` after each run.
        **craft_kwargs: further :func:`uap.craft` arguments for every run (``batch_size`` …).
    """
    from uap.runs import craft_run

    p = check_norm(norm)
    eps_values = sorted({_eps_key(check_eps(e, p)) for e in eps} | {_eps_key(check_eps(eps_base, p))})
    counts = _check_counts(list(n_images) + [n_base], "n_images and n_base")
    if not methods:
        raise ValueError("a sweep needs at least one method")
    for m in methods:
        make_method(m)  # unknown methods fail before any work
    check_images(x, "x (the crafting pool)")
    if max(counts) > len(x):
        raise ValueError(f"the sweep needs {max(counts)} crafting images, x has {len(x)}")
    if heldout is None:
        raise ValueError("a sweep measures held-out fooling rates: give held-out images")
    limits = dict(n_limits or {})
    for m, limit in limits.items():
        if m not in methods:
            raise ValueError(f"n_limits names {m!r}, which is not one of the sweep's methods {list(methods)}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < n_base:
            raise ValueError(f"the |X| limit of {m!r} must be an integer ≥ n_base ({n_base}), got {limit!r}")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    points = sweep_points(list(methods), counts, eps_values, n_base=n_base, eps_base=_eps_key(eps_base),
                          n_limits=limits)
    summaries: dict[SweepPoint, dict[str, Any]] = {}
    out = Path(out_dir)
    for k, point in enumerate(points):
        result = craft_run(out / "points" / point.slug, model, x[order[:point.n_images]],
                           settings={**dict(settings or {}), "sweep_point": point.slug}, heldout=heldout,
                           resume=resume, eps=point.eps, norm=p, delta=delta, max_passes=passes,
                           method=point.method, seed=seed, model_id=model_id,
                           data=f"{data}:n={point.n_images}" if data else None, **craft_kwargs)
        summaries[point] = result.summary
        if callback is not None:
            callback({"event": "point", "index": k + 1, "total": len(points), "point": point,
                      "summary": result.summary})
    rows: list[dict[str, Any]] = []
    baselines: dict[float, dict[str, Any]] = {}
    for point, s in summaries.items():
        baselines.setdefault(_eps_key(point.eps), s["baseline"])
    for method in methods:
        base = summaries[SweepPoint(method, n_base, _eps_key(eps_base))]
        capped = [n for n in counts if n <= limits.get(method, n)]
        for axis, values in (("n_images", capped), ("eps", eps_values)):  # both include the base point
            for value in values:
                point = (SweepPoint(method, value, _eps_key(eps_base)) if axis == "n_images"
                         else SweepPoint(method, n_base, value))
                if point in summaries:
                    rows.append(_row(axis, value, point, summaries[point]))
        last, elapsed = None, 0.0
        for i in range(1, passes + 1):
            if i <= len(base["history"]):
                last = base["history"][i - 1]
                elapsed += float(last.get("seconds") or 0.0)
            per_pass = {"fooling_rate": last["fooling_rate"], "heldout_fooling_rate": last["heldout_fooling_rate"],
                        "heldout_accuracy": last.get("heldout_accuracy"), "passes": i}
            rows.append({**_row("passes", i, SweepPoint(method, n_base, _eps_key(eps_base)), base), **per_pass})
            if i <= len(base["history"]):  # wall-clock time: the base run's cumulative seconds after pass i
                rows.append({**_row("seconds", round(elapsed, 3), SweepPoint(method, n_base, _eps_key(eps_base)), base),
                             **per_pass, "seconds": round(elapsed, 3)})
    record = {"model": model_id, "data": data, "norm": norm_name(p), "methods": list(methods), "n_images": counts,
              "eps": eps_values, "n_base": n_base, "eps_base": _eps_key(eps_base), "passes": passes, "delta": delta,
              "seed": seed, "n_limits": limits, "n_heldout": len(heldout[0] if isinstance(heldout, (tuple, list)) else heldout),
              **dict(settings or {})}
    return Sweep(rows=rows, baselines=baselines, settings=record)


def _row(axis: str, value: float, point: SweepPoint, s: Mapping[str, Any]) -> dict[str, Any]:
    return {"axis": axis, "value": value, "method": point.method, "n_images": point.n_images, "eps": point.eps,
            "passes": s["passes"], "fooling_rate": s["fooling_rate"], "heldout_fooling_rate": s["heldout_fooling_rate"],
            "heldout_accuracy": s["heldout_accuracy"], "seconds": s["seconds"]}
