"""Figures for evaluation reports: transfer heatmap, perturbation grid, clean-vs-perturbed examples.

All figures are drawn on a ``matplotlib.figure.Figure`` with the Agg canvas directly — no
``pyplot`` global state, no GUI backend, safe in threads and on headless machines — and
written atomically (temporary file, then ``os.replace``).

- :func:`plot_heatmap` — the UAP paper's Table 2 as a picture (Moosavi-Dezfooli et al., CVPR
  2017): rows = perturbation (the model it was crafted on), columns = model it is applied to,
  the value printed in every cell; baseline rows (``Report.baselines``) below a line, their
  names in grey italics.
- :func:`plot_perturbations` — each perturbation rescaled from ``[-‖v‖∞, ‖v‖∞]`` to ``[0, 1]``
  (grey = 0) so its structure is visible; a perturbation of 8/255 is invisible at scale 1.
- :func:`plot_sweep` — budget curves (:mod:`uap.sweep`): held-out fooling rate against |X|,
  ε and passes, one line per method, the strongest data-free baseline dashed;
- :func:`plot_examples` — a few images clean and with each perturbation, captioned with the
  label a model gives them (red when the perturbation changed that model's decision); the
  labels come from the engine's forward path (:class:`uap.forward.Inference`), the same one
  the reported numbers come from.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter, ScalarFormatter
from torch import nn

from uap.atomic import atomic_write
from uap.forward import Inference, check_images
from uap.report import Report

__all__ = ["plot_heatmap", "plot_sweep", "heatmap_figure", "plot_perturbations", "plot_examples", "write_figures", "amplify", "save_figure"]


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Render ``fig`` with Agg and write it atomically as PNG; returns the path."""
    FigureCanvasAgg(fig)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"))


def _hwc(img: torch.Tensor) -> np.ndarray:
    """C×H×W tensor in [0, 1] → H×W×C (or H×W for one channel) numpy array for ``imshow``."""
    arr = img.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def amplify(v: torch.Tensor) -> torch.Tensor:
    """Map ``v`` from ``[-‖v‖∞, ‖v‖∞]`` to ``[0, 1]`` (0 → 0.5 grey) for display."""
    m = float(v.abs().max())
    return torch.full_like(v, 0.5) if m == 0 else 0.5 + 0.5 * v / m


# ---------------------------------------------------------------------------- heatmap

def plot_heatmap(
    report: Report,
    path: str | os.PathLike,
    *,
    metric: str = "fooling_rate",
    title: str | None = None,
    percent: bool = True,
) -> Path:
    """Write :func:`heatmap_figure` as a PNG at ``path``."""
    return save_figure(heatmap_figure(report, metric=metric, title=title, percent=percent), path)


def heatmap_figure(
    report: Report,
    *,
    metric: str = "fooling_rate",
    title: str | None = None,
    percent: bool = True,
) -> Figure:
    """Heatmap of ``report.<metric>`` (perturbations × models) with the value in each cell.

    Missing values (NaN) are left blank and marked "–". ``percent`` prints 0.734 as 73.4.
    A UAP on its own source model (row and column of the same name, the diagonal of a
    transfer matrix) is printed in bold. Baseline rows are set apart: a white line above
    the first of them, and their names in grey italics.
    """
    if metric not in ("fooling_rate", "accuracy", "dominant_share", "embedding_cosine"):
        raise ValueError(f"unknown metric {metric!r}")
    data = np.asarray(getattr(report, metric), dtype=float)
    P, M = data.shape
    if P == 0 or M == 0:
        raise ValueError("the report is empty: nothing to plot")
    scale = 100.0 if percent else 1.0
    fig = Figure(figsize=(1.0 + 0.95 * M, 1.0 + 0.6 * P + 0.6))
    ax = fig.add_subplot(1, 1, 1)
    vmax = 1.0 if metric != "embedding_cosine" else max(1.0, float(np.nanmax(data)) if np.isfinite(data).any() else 1.0)
    vmin = 0.0 if metric != "embedding_cosine" else min(0.0, float(np.nanmin(data)) if np.isfinite(data).any() else 0.0)
    im = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(M), labels=report.models, rotation=30, ha="right")
    ax.set_yticks(range(P), labels=report.perturbations)
    for label, name in zip(ax.get_yticklabels(), report.perturbations):
        if report.is_baseline(name):
            label.set_fontstyle("italic")
            label.set_color("0.4")
    first_baseline = next((i for i, name in enumerate(report.perturbations) if report.is_baseline(name)), None)
    if first_baseline:
        ax.axhline(first_baseline - 0.5, color="white", linewidth=3)
    ax.set_xlabel("applied to (model)")
    ax.set_ylabel("crafted on (perturbation)")
    for i in range(P):
        for j in range(M):
            v = data[i, j]
            text = "–" if math.isnan(v) else f"{v * scale:.1f}" if percent else f"{v:.2f}"
            light = not math.isnan(v) and (v - vmin) / ((vmax - vmin) or 1.0) < 0.6
            ax.text(j, i, text, ha="center", va="center", fontsize=9,
                    color="white" if light else "black",
                    fontweight="bold" if report.perturbations[i] == report.models[j] else "normal")
    unit = " (%)" if percent else ""
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label(metric.replace("_", " ") + unit)
    if percent:
        cbar.ax.yaxis.set_major_formatter(lambda t, _pos: f"{t * 100:.0f}")
    ax.set_title(title or f"{metric.replace('_', ' ')}{unit} on {report.n_images} held-out images", fontsize=10)
    return fig


# ---------------------------------------------------------------------------- perturbation grid

def plot_perturbations(
    perturbations: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    columns: int = 4,
    title: str | None = None,
) -> Path:
    """Grid of perturbations (one panel each), amplified with :func:`amplify` for visibility.

    Each panel is captioned with its name and ``‖v‖∞`` in 1/255 units and ``‖v‖2``.
    """
    items = [(k, (v.v if hasattr(v, "v") else v).detach().float().cpu()) for k, v in perturbations.items()]
    if not items:
        raise ValueError("no perturbations to plot")
    for name, v in items:
        if v.dim() != 3:
            raise ValueError(f"perturbation {name!r} must be C×H×W, got {tuple(v.shape)}")
    cols = max(1, min(columns, len(items)))
    rows = math.ceil(len(items) / cols)
    fig = Figure(figsize=(2.3 * cols, 2.5 * rows + 0.3))
    for k, (name, v) in enumerate(items):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(_hwc(amplify(v)), cmap="gray" if v.shape[0] == 1 else None, interpolation="nearest")
        ax.set_title(f"{name}\n‖v‖∞={float(v.abs().max()) * 255:.1f}/255  ‖v‖₂={float(v.norm()):.2f}", fontsize=8)
        ax.set_axis_off()
    fig.suptitle(title or "perturbations (amplified: ±‖v‖∞ → black/white, 0 → grey)", fontsize=9)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------- examples

def _label(k: int, classes: Sequence[str] | None) -> str:
    return classes[k] if classes is not None and 0 <= k < len(classes) else str(k)


def plot_examples(
    x: torch.Tensor,
    perturbations: Mapping[str, torch.Tensor],
    labelled_by: Mapping[str, tuple[str, nn.Module]],
    path: str | os.PathLike,
    *,
    y: torch.Tensor | None = None,
    classes: Sequence[str] | None = None,
    k: int = 6,
) -> Path:
    """A few images clean (first column) and with each perturbation (one column each).

    Args:
        x: candidate images in [0, 1]; ``k`` of them, evenly spaced through ``x``, are shown.
        perturbations: ``{name: v}`` — the columns after the clean one.
        labelled_by: ``{perturbation name: (model name, model)}`` — whose prediction captions
            that column; the caption is red when the perturbation changed that model's
            clean prediction.
        y: true labels, shown under the clean images.
        classes: class names for the captions.
        k: number of example images (rows).
    """
    check_images(x)
    missing = [p for p in perturbations if p not in labelled_by]
    if missing:
        raise ValueError(f"no model to label perturbation(s) {missing}")
    k = max(1, min(k, len(x)))
    idx = torch.linspace(0, len(x) - 1, k).round().long().unique()
    xs = x[idx].detach().float().cpu()
    names = list(perturbations)
    cols = 1 + len(names)
    fig = Figure(figsize=(1.7 * cols, 1.9 * len(idx) + 0.6))
    runs: dict[str, tuple[Inference, torch.Tensor]] = {}  # model name → (its pass, clean labels)
    for c, name in enumerate(names, start=1):
        mname, model = labelled_by[name]
        if mname not in runs:
            run = Inference(model, name=mname)
            runs[mname] = run, run(xs).predictions
        run, clean = runs[mname]
        v = perturbations[name]
        v = (v.v if hasattr(v, "v") else v).detach().float().cpu()
        pred = run(xs, v).predictions
        xp = (xs + v.unsqueeze(0)).clamp(0, 1)
        for r in range(len(idx)):
            ax = fig.add_subplot(len(idx), cols, r * cols + c + 1)
            ax.imshow(_hwc(xp[r]), interpolation="nearest")
            before, after = int(clean[r]), int(pred[r])
            caption = f"{mname}: {_label(after, classes)}" if before == after else \
                f"{mname}: {_label(before, classes)}→\n{_label(after, classes)}"
            ax.set_title(caption, fontsize=7, color="red" if before != after else "black")
            ax.set_axis_off()
            if r == 0:
                ax.text(0.5, 1.35, name, transform=ax.transAxes, ha="center", fontsize=8, fontweight="bold")
    for r in range(len(idx)):
        ax = fig.add_subplot(len(idx), cols, r * cols + 1)
        ax.imshow(_hwc(xs[r]), interpolation="nearest")
        caption = f"true: {_label(int(y[idx[r]]), classes)}" if y is not None else f"image {int(idx[r])}"
        ax.set_title(caption, fontsize=7)
        ax.set_axis_off()
        if r == 0:
            ax.text(0.5, 1.35, "clean", transform=ax.transAxes, ha="center", fontsize=8, fontweight="bold")
    fig.suptitle("examples: caption = model's label on the perturbed image\n(red: clean label → perturbed label, "
                 "changed by the perturbation)", fontsize=8)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------- all figures of a report

def write_figures(
    out_dir: str | os.PathLike,
    report: Report,
    perturbations: Mapping[str, torch.Tensor],
    models: Mapping[str, nn.Module],
    x: torch.Tensor,
    *,
    y: torch.Tensor | None = None,
    k: int = 6,
) -> dict[str, Path]:
    """Write ``heatmap.png``, ``perturbations.png`` and ``examples.png`` into ``out_dir``.

    In the examples, a perturbation named after a model (a transfer row), or a baseline row made
    for one (its ``model`` in the report's ``meta["baselines"]``, e.g. ``fourier:<model>``), is
    captioned with that model's labels; any other (``random``, a chessboard, a file from
    elsewhere) with the first model's.
    """
    if not models:
        raise ValueError("no models to label the examples with")
    out = Path(out_dir)
    first = next(iter(models.items()))
    rows = report.meta.get("baselines")
    rows = rows if isinstance(rows, Mapping) else {}

    def labeller(name: str) -> tuple[str, nn.Module]:
        facts = rows.get(name)
        source = facts.get("model", name) if isinstance(facts, Mapping) else name
        return (source, models[source]) if source in models else first

    labelled_by = {p: labeller(p) for p in perturbations}
    return {
        "heatmap": plot_heatmap(report, out / "heatmap.png"),
        "perturbations": plot_perturbations(perturbations, out / "perturbations.png"),
        "examples": plot_examples(x, perturbations, labelled_by, out / "examples.png", y=y,
                                  classes=report.classes, k=k),
    }


# ---------------------------------------------------------------------------- budget curves

def plot_sweep(sweep, path: str | os.PathLike) -> Path:
    """The curves of a :class:`uap.sweep.Sweep` as one PNG: held-out fooling rate (%) against
    |X| (log scale), ε (in 1/255 for ℓ∞) and passes; the strongest data-free baseline is the
    dashed black line (at each point's ε)."""
    s = sweep.settings
    linf = s.get("norm") == "inf"
    fig = Figure(figsize=(17, 3.8))
    titles = {"n_images": f"|X| (ε = {_eps_text(s['eps_base'], linf)}, {s['passes']} passes)",
              "eps": f"ε (|X| = {s['n_base']}, {s['passes']} passes)",
              "passes": f"passes (|X| = {s['n_base']}, ε = {_eps_text(s['eps_base'], linf)})",
              "seconds": "wall-clock seconds of the base run (evaluations included)"}
    for k, axis in enumerate(("n_images", "eps", "passes", "seconds")):
        ax = fig.add_subplot(1, 4, k + 1)
        for method in sweep.methods:
            pts = sweep.curve(method, axis)
            xs = [(_x(axis, v, linf)) for v, _ in pts]
            ax.plot(xs, [100 * r for _, r in pts], marker="o", ms=3, label=method)
        ref = sorted({(r["value"], r["eps"]) for r in sweep.rows if r["axis"] == axis})
        ax.plot([_x(axis, v, linf) for v, _ in ref], [100 * sweep.baseline_at(e) for _, e in ref], "k--",
                label="strongest baseline")
        if axis == "n_images":
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks([v for v, _ in ref])
        if axis == "passes":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(titles[axis])
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        if k == 0:
            ax.set_ylabel("held-out fooling rate (%)")
    fig.axes[0].legend(fontsize=8, loc="upper left")
    norm = "∞" if linf else s.get("norm")
    fig.suptitle(f"{s.get('model') or 'model'} · ℓ{norm} · {s.get('n_heldout')} held-out images", fontsize=10)
    return save_figure(fig, path)


def _x(axis: str, value: float, linf: bool) -> float:
    return value * 255 if axis == "eps" and linf else value


def _eps_text(eps: float, linf: bool) -> str:
    return f"{eps * 255:.3g}/255" if linf else f"{eps:.3g}"


def plot_audit(audit, path: str | os.PathLike) -> Path:
    """A :class:`uap.audit.Audit` as one PNG: per model, the held-out fooling rate of every
    attack (dark) and baseline (light) with its 95 % interval, the worst case outlined."""
    models = list(audit.reports)
    fig = Figure(figsize=(5.5 * len(models), 0.35 * max(len(audit.rows(m)) for m in models) + 1.6))
    for k, model in enumerate(models):
        ax = fig.add_subplot(1, len(models), k + 1)
        rows = sorted(audit.rows(model), key=lambda r: r["fooling_rate"])
        worst = audit.worst(model)["fooling_attack"]
        rates = np.array([100 * r["fooling_rate"] for r in rows])
        errors = np.array([[100 * (r["fooling_rate"] - r["fooling_rate_low"]), 100 * (r["fooling_rate_high"] - r["fooling_rate"])]
                           for r in rows]).T
        colours = ["#1f4e79" if r["kind"] == "crafted" else "#9bbbd4" for r in rows]
        bars = ax.barh(range(len(rows)), rates, xerr=np.clip(np.nan_to_num(errors), 0, None), color=colours, ecolor="0.3", capsize=2)
        for bar, r in zip(bars, rows):
            if r["attack"] == worst:
                bar.set_edgecolor("#c00000")
                bar.set_linewidth(2)
        ax.set_yticks(range(len(rows)), [r["attack"] for r in rows], fontsize=8)
        ax.set_xlim(0, 100)
        ax.set_xlabel("held-out fooling rate (%)")
        ax.grid(axis="x", alpha=0.3)
        clean = audit.worst(model)["clean_accuracy"]
        ax.set_title(f"{model}\nclean acc. {100 * clean:.1f} %" if clean == clean else model, fontsize=9)
    m = audit.meta
    fig.suptitle(f"uap audit ({audit.protocol['name']} v{audit.protocol['version']}) · ℓ{m['norm']} ε={m['eps']:.4g} · "
                 f"{m['n_eval']} held-out images", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
