"""``transfer_matrix``: one UAP per source model, every UAP on every model, plus baseline rows.

This reproduces the protocol of Moosavi-Dezfooli et al. (CVPR 2017, Table 2): a universal
perturbation is crafted on each source model with the same budget (ε, p), the same stop rule
(δ, maximum passes) and the same crafting images; all of them are then applied to all models
on the same *held-out* images. Row = model the UAP was crafted on, column = model it is
applied to, cell = fooling rate. The diagonal is each UAP's own held-out fooling rate; the
off-diagonal cells measure how well universal perturbations transfer across models.

The last rows are baselines of the same ℓp norm (:mod:`uap.baselines`): ``random`` noise
(the paper's random row), ``gaussian`` noise, ``chessboard1/2/4/8`` patterns and, per source
model, ``fourier:<source>`` — the best single Fourier basis image for that source, searched
on the *crafting* images like the UAPs. The gap between a UAP's row and the baseline rows is
what its universal structure buys beyond its size, and beyond what a fixed pattern or a
gradient-free search gets at that size.

Resuming: with ``out_dir``, each source's crafting is a run in
``out_dir/perturbations/`` named after the source (:class:`uap.runs.RunFolder`):
``<source>.{safetensors,json}`` is the perturbation and ``<source>.settings.json``, written
last, records exactly what it was crafted with — the budget, stop rule, method, seed and
every other :func:`uap.craft` argument, and SHA-256 fingerprints of the crafting images,
the held-out images and the source model's weights. A later run with the same ``out_dir``
reuses every perturbation whose record matches and crafts the rest, replacing what no
longer matches. While a perturbation is being crafted it is checkpointed after every pass
(``<source>.partial.*``) and a re-run continues from the last finished pass, exactly
(visiting orders depend only on the seed and the pass number), so an interruption loses at
most one pass. Each source's run is locked while it is written: a second process that
tries to write it gets :class:`uap.runs.RunLocked`.

With ``ensemble=True`` one more row, :data:`ENSEMBLE_ROW`, measures black-box transfer from an
ensemble: its cell in column ``c`` is a UAP crafted against every source *but* ``c`` (one ``v``
for the mean of their losses, :func:`uap.craft` with a list of models) and applied to ``c`` — so
no cell sees its own model. A column that is not a source gets the ensemble of all sources.
Each distinct ensemble is one run in ``out_dir/perturbations/`` (``ensemble-without-<c>``,
``ensemble-all``), reused like the sources'; under ``torch.distributed`` all ranks craft it
together.

Under ``torch.distributed`` the sources are dealt to the ranks round-robin (source ``k`` to
rank ``k mod W``); each rank crafts its sources by itself (:func:`uap.distributed.alone`),
reusing and writing their runs in ``out_dir`` as one process would, then sends every rank
the perturbations it made. The cells are then evaluated with the held-out images sharded
over the ranks. Crafting is deterministic, so the matrix is the one-process matrix.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from uap import universal
from uap.baselines import parse_baselines, row_names
from uap.distributed import alone, world
from uap.evaluate import as_named_models, baselines_at_budget, evaluate
from uap.forward import DEFAULT_BATCH_SIZE
from uap.images import Images, is_images
from uap.methods import make_method
from uap.metrics import DEFAULT_CACHE
from uap.perturbation import Perturbation, share_perturbation
from uap.projection import check_eps, check_norm, norm_name
from uap.report import Report
from uap.runs import RunFolder

__all__ = ["transfer_matrix", "Transfer", "RANDOM_ROW", "ENSEMBLE_ROW"]

#: Name of the random-noise baseline row.
RANDOM_ROW = "random"

#: Name of the row whose cell in column ``c`` is the UAP of the ensemble of every source but ``c``.
ENSEMBLE_ROW = "ensemble (all but the column)"

#: ``uap.craft`` arguments that transfer_matrix itself sets (same for every source).
_SET_HERE = {"eps", "norm", "delta", "max_passes", "method", "seed", "heldout", "callback", "resume",
             "model_id", "data"}

#: ``callback(event, info)``: ``"craft"`` (crafting on a source model starts; info: model,
#: index, total, resumed_passes), ``"craft_step"`` (the engine's event dict, ``"progress"``
#: or ``"pass"``, plus model), ``"reused"`` and ``"saved"`` (model, index, total, path: the
#: stem of the perturbation's files), ``"baseline"`` (baseline, model: a per-model baseline row,
#: e.g. the Fourier search on that model, starts), ``"evaluate"`` (done, total, desc).
EventFn = Callable[[str, dict], None]


@dataclass
class Transfer:
    """Result of :func:`transfer_matrix`.

    Attributes:
        report: the evaluation; rows = source models then the baselines, columns = models.
        perturbations: ``{row name: v}`` (C×H×W tensors), the baseline rows included.
        crafted: ``{source model: Perturbation}`` as returned by the engine (or loaded back).
        reused: names of the sources whose perturbation was loaded from ``out_dir``.
        ensembles: ``{column: Perturbation}`` of the ensemble row (``ensemble=True``): the UAP
            crafted against every source but the column.
    """

    report: Report
    perturbations: dict[str, torch.Tensor]
    crafted: dict[str, Perturbation] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    ensembles: dict[str, Perturbation] = field(default_factory=dict)


def transfer_matrix(
    models: Mapping[str, nn.Module] | Sequence[nn.Module],
    x_craft: torch.Tensor | Images,
    x_eval: torch.Tensor | Images,
    y_eval: torch.Tensor | None = None,
    *,
    eps: float,
    norm: float | int | str = math.inf,
    delta: float = 0.2,
    max_passes: int = 10,
    method: str = "deepfool",
    seed: int = 0,
    sources: Sequence[str] | None = None,
    model_ids: Mapping[str, str] | None = None,
    out_dir: str | os.PathLike | None = None,
    baselines: str | Sequence[str] | None = "all",
    batch_size: int = DEFAULT_BATCH_SIZE,
    embeddings: bool = True,
    classes: Sequence[str] | None = None,
    craft_kwargs: Mapping[str, Any] | None = None,
    callback: EventFn | None = None,
    ensemble: bool = False,
) -> Transfer:
    """Craft one UAP per source model and evaluate every UAP on every model.

    Args:
        models: ``{name: target}`` — the columns, and by default also the sources (rows).
        x_craft: images the UAPs are crafted on (in [0, 1]), shared by all sources.
        x_eval: held-out images all cells are measured on; must not be ``x_craft``. Either
            may be a :class:`uap.images.Images` set (uint8, floats per batch): ``x_eval`` is
            then streamed through every measurement, ``x_craft`` turned into a tensor to craft on.
        y_eval: labels of ``x_eval`` (for accuracies), optional.
        eps, norm, delta, max_passes, method, seed: passed to :func:`uap.craft` for every
            source — the same budget, stop rule and seed for all rows.
        sources: which models to craft on (default: all of ``models``).
        model_ids: ``{name: id}`` stored as each perturbation's model (e.g. zoo name or path).
        out_dir: where crafted perturbations are saved and, on a re-run, reused or continued
            (see the module docstring).
        baselines: baseline rows (names of :data:`uap.baselines.BASELINES`, ``"chessboard"``
            for every board, or a comma-separated string; default: all), each with the same ℓp
            norm as the crafted UAPs (the largest of their norms, i.e. ε when they saturate
            the budget: :func:`uap.evaluate.baselines_at_budget`). A baseline that needs
            models (``fourier``) adds one row per source, searched on ``x_craft`` only.
        batch_size, embeddings, classes: passed to :func:`uap.evaluate`.
        craft_kwargs: extra keyword arguments for :func:`uap.craft`.
        callback: ``callback(event, info)`` for progress (see :data:`EventFn`).
        ensemble: add :data:`ENSEMBLE_ROW` (module docstring); needs a method that crafts
            against several models (the projected-ascent family).
    """
    named = as_named_models(models)
    p = check_norm(norm)
    eps = check_eps(eps, p)
    sources = list(named) if sources is None else [str(s) for s in sources]
    unknown = [s for s in sources if s not in named]
    if unknown:
        raise ValueError(f"source model(s) {unknown} are not among the models {list(named)}")
    if not sources:
        raise ValueError("no source models to craft on")
    chosen = parse_baselines(baselines)
    reserved = sorted(set(row_names(chosen, sources)) & set(named))
    if reserved:
        raise ValueError(f"model name(s) {reserved} are reserved for baseline rows; rename the model(s)")
    for name, t in (("x_craft", x_craft), ("x_eval", x_eval)):
        if not (isinstance(t, torch.Tensor) or is_images(t)) or t.dim() != 4 or len(t) == 0:
            raise ValueError(f"{name} must be a non-empty N×C×H×W tensor (or uap.images.Images) of images")
    if x_craft.shape[1:] != x_eval.shape[1:]:
        raise ValueError(f"x_craft images are {tuple(x_craft.shape[1:])} but x_eval images are {tuple(x_eval.shape[1:])}")
    if x_craft is x_eval:
        raise ValueError("x_eval must be held-out images, not the crafting set itself")
    if is_images(x_craft):  # crafting indexes random minibatches with gradients: it works on a tensor
        x_craft = x_craft.tensor()
    craft_kwargs = dict(craft_kwargs or {})
    clash = sorted(set(craft_kwargs) & _SET_HERE)
    if clash:
        raise ValueError(f"craft_kwargs cannot set {clash}: transfer_matrix sets them for every source")
    universal.check_stop_rule(delta, max_passes)  # before out_dir is touched: a bad setting leaves nothing behind
    made = make_method(method, craft_kwargs.get("method_options"))
    if ensemble:
        from uap.methods.ensemble import check_ensemble

        check_ensemble(made, max(len([s for s in sources if s != c]) for c in named))
    model_ids = dict(model_ids or {})
    emit = callback or (lambda _event, _info: None)
    runs = ({s: RunFolder(Path(out_dir) / "perturbations", s) for s in sources}  # bad names fail before crafting
            if out_dir is not None else {})
    heldout = x_eval if y_eval is None else (x_eval, y_eval)

    crafted: dict[str, Perturbation] = {}
    reused: list[str] = []
    rank, ranks = world()
    for k, source in enumerate(sources):
        if k % ranks != rank:
            continue  # another rank's source
        position = {"model": source, "index": k, "total": len(sources)}
        args = dict(eps=eps, norm=p, delta=delta, max_passes=max_passes, method=method, seed=seed,
                    model_id=model_ids.get(source, source), data=f"{len(x_craft)} crafting images", **craft_kwargs)

        def on_event(event: dict, position: dict = position) -> None:
            kind, source = event.get("event"), position["model"]
            if kind == "start":
                emit("craft", {**position, "resumed_passes": event["resumed_passes"]})
            elif kind in ("reused", "saved"):
                emit(kind, {**position, "path": str(runs[source].folder / source)})
            else:  # the engine's "progress" and "pass" events
                emit("craft_step", {**event, "model": source})

        with alone():  # this rank crafts the source by itself
            if out_dir is not None:  # reuse, continue or craft the run <source> in out_dir/perturbations/
                run = runs[source].craft(named[source], x_craft, settings={"source": source}, heldout=heldout,
                                         callback=on_event, resume=True, replace=True, **args)
                crafted[source] = run.perturbation
                if run.reused:
                    reused.append(source)
            else:
                on_event({"event": "start", "resumed_passes": 0})
                crafted[source] = universal.craft(named[source], x_craft, heldout=heldout, callback=on_event, **args)
    if ranks > 1:
        crafted, reused = _share_crafted(sources, crafted, reused)
        # Crafting alone filled this rank's clean-prediction cache for its own sources only; a
        # cache hit skips the sharded pass (and its gather) that the other ranks then make.
        DEFAULT_CACHE.clear()

    perturbations: dict[str, torch.Tensor] = {s: _vector(crafted[s]) for s in sources}
    meta: dict[str, Any] = {
        "eps": eps, "norm": norm_name(p), "delta": delta, "max_passes": max_passes, "method": method,
        "seed": seed, "n_craft": len(x_craft), "n_eval": len(x_eval), "sources": sources,
        "reused": reused, "model_ids": {m: model_ids.get(m, m) for m in named},
    }
    built = baselines_at_budget(chosen, x_eval.shape[1:], perturbations, norm=p, models={s: named[s] for s in sources},
                                x_craft=x_craft, seed=seed, batch_size=batch_size, callback=emit)
    meta.update({**built.meta(), "n_craft": len(x_craft)})  # the UAPs were crafted on x_craft, whatever the rows used
    baseline_rows = built.perturbations

    def on_eval(done: int, total: int, desc: str) -> None:
        emit("evaluate", {"done": done, "total": total, "desc": desc})

    report = evaluate(perturbations, named, x_eval, y_eval, batch_size=batch_size, embeddings=embeddings,
                      classes=classes, progress=on_eval, meta=meta, baselines=baseline_rows)
    ensembles: dict[str, Perturbation] = {}
    if ensemble:
        ensembles = _craft_ensembles(named, sources, x_craft, heldout, args_for_ensembles(eps, p, delta, max_passes,
                                     method, seed, x_craft, craft_kwargs), out_dir, emit)
        cells = {c: evaluate({ENSEMBLE_ROW: e.v}, {c: named[c]}, x_eval, y_eval, batch_size=batch_size,
                             embeddings=embeddings, classes=classes) for c, e in ensembles.items()}
        report = _with_row(report, ENSEMBLE_ROW, cells, after=len(sources))
        report.meta["ensemble"] = {c: [s for s in sources if s != c] for c in ensembles}
        if ensembles:
            perturbations[ENSEMBLE_ROW] = _vector(next(iter(ensembles.values())))
    return Transfer(report=report, perturbations={**perturbations, **baseline_rows}, crafted=crafted, reused=reused,
                    ensembles=ensembles)


def args_for_ensembles(eps: float, p: float, delta: float, max_passes: int, method: str, seed: int,
                       x_craft: torch.Tensor, craft_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The :func:`uap.craft` arguments of an ensemble row's runs: the sources' own."""
    return dict(eps=eps, norm=p, delta=delta, max_passes=max_passes, method=method, seed=seed,
                data=f"{len(x_craft)} crafting images", **craft_kwargs)


def _craft_ensembles(named: Mapping[str, nn.Module], sources: Sequence[str], x_craft: torch.Tensor, heldout: Any,
                     args: dict[str, Any], out_dir: str | os.PathLike | None, emit: EventFn) -> dict[str, Perturbation]:
    """``{column: UAP of every source but the column}``, each distinct ensemble crafted once."""
    members = {c: [s for s in sources if s != c] for c in named}
    made: dict[tuple[str, ...], Perturbation] = {}
    out: dict[str, Perturbation] = {}
    for column, group in members.items():
        key = tuple(group)
        if not group:
            continue  # the only source is the column itself: the cell stays empty
        if key not in made:
            name = "ensemble-all" if len(group) == len(sources) else f"ensemble-without-{column}"
            emit("craft", {"model": name, "index": len(made), "total": len(set(map(tuple, members.values()))),
                           "resumed_passes": 0})
            models = {s: named[s] for s in group}

            def on_event(event: dict, name: str = name) -> None:
                if event.get("event") in ("progress", "pass"):
                    emit("craft_step", {**event, "model": name})

            if out_dir is not None:
                run = RunFolder(Path(out_dir) / "perturbations", name).craft(
                    list(models.values()), x_craft, settings={"ensemble": list(group)}, heldout=heldout,
                    callback=on_event, resume=True, replace=True, model_id=list(group), **args)
                made[key] = run.perturbation
            else:
                made[key] = universal.craft(models, x_craft, heldout=heldout, callback=on_event, **args)
        out[column] = made[key]
    return out


def _with_row(report: Report, name: str, cells: Mapping[str, Report], after: int) -> Report:
    """``report`` with the row ``name`` inserted at position ``after``; its cell in column ``c``
    is the one-cell report ``cells[c]`` (NaN where a column has none)."""
    import numpy as np

    from uap.report import METRICS

    m = len(report.models)

    def row(metric: str, fill: float) -> np.ndarray:
        return np.array([[float(getattr(cells[c], metric)[0, 0]) if c in cells else fill for c in report.models]])

    values = {k: np.insert(getattr(report, k), after, row(k, np.nan), axis=0) for k in METRICS}
    labels = np.insert(report.dominant_label, after,
                       np.array([[int(cells[c].dominant_label[0, 0]) if c in cells else -1 for c in report.models]]), axis=0)
    norms = {k: np.insert(getattr(report, k), after, max((float(getattr(r, k)[0]) for r in cells.values()), default=0.0))
             for k in ("norm_linf", "norm_l2")}
    assert labels.shape == (len(report.perturbations) + 1, m)
    return Report(perturbations=[*report.perturbations[:after], name, *report.perturbations[after:]],
                  models=list(report.models), dominant_label=labels, clean_accuracy=report.clean_accuracy,
                  n_images=report.n_images, classes=report.classes, meta=dict(report.meta),
                  baselines=list(report.baselines), **values, **norms)


def _share_crafted(sources: Sequence[str], crafted: dict[str, Perturbation], reused: list[str]
                   ) -> tuple[dict[str, Perturbation], list[str]]:
    """Every source's perturbation (and whether it was reused) on every rank, each sent by the
    rank that crafted it, in source order."""
    ranks = world()[1]
    shared: dict[str, Perturbation] = {}
    for k, source in enumerate(sources):
        pert, info = share_perturbation(crafted.get(source), src=k % ranks, reused=source in reused)
        shared[source] = pert
        if info["reused"] and source not in reused:
            reused.append(source)
    return shared, [s for s in sources if s in reused]


def _vector(pert: Any) -> torch.Tensor:
    v = pert.v if hasattr(pert, "v") else pert
    return v.detach().float().cpu()
