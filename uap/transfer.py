"""``transfer_matrix``: one UAP per source model, every UAP on every model, plus random noise.

This reproduces the protocol of Moosavi-Dezfooli et al. (CVPR 2017, Table 2): a universal
perturbation is crafted on each source model with the same budget (ε, p), the same stop rule
(δ, maximum passes) and the same crafting images; all of them are then applied to all models
on the same *held-out* images. Row = model the UAP was crafted on, column = model it is
applied to, cell = fooling rate. The diagonal is each UAP's own held-out fooling rate; the
off-diagonal cells measure how well universal perturbations transfer across models.

A last row, ``random``, applies random noise of the same ℓp norm (see
:mod:`uap.baseline`): the gap between a UAP's row and the random row is what its universal
*structure* buys, beyond its size.

Resuming: with ``out_dir``, every crafted perturbation is saved under
``out_dir/perturbations/<source>.{safetensors,json}`` followed by a
``<source>.settings.json`` that records exactly what it was crafted with — budget, stop rule,
method, seed, a SHA-256 of the crafting images and of the source model's weights. A later run
with the same ``out_dir`` loads every perturbation whose settings match and crafts only the
rest. While a perturbation is being crafted, it is also checkpointed after every pass as
``<source>.partial.*`` and a re-run continues from the last finished pass
(``uap.craft(resume=...)``, whose visiting order depends only on the seed and the pass
number), so an interruption loses at most one pass. The settings file is written last (and
atomically), so a crash mid-save is seen as "not crafted".
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from uap import universal
from uap.baseline import random_perturbation
from uap.evaluate import as_named_models, evaluate
from uap.perturbation import Perturbation
from uap.projection import check_eps, check_norm, lp_norm, norm_name
from uap.atomic import atomic_write
from uap.report import Report

__all__ = ["transfer_matrix", "Transfer", "RANDOM_ROW", "model_fingerprint", "tensor_fingerprint"]

#: Name of the random-noise baseline row.
RANDOM_ROW = "random"

#: ``uap.craft`` arguments that transfer_matrix itself sets (same for every source).
_SET_HERE = {"eps", "norm", "delta", "max_passes", "method", "seed", "heldout", "callback", "resume",
             "model_id", "data"}

#: ``callback(event, info)``: ``"craft"`` (a source model starts; info: model, index, total),
#: ``"craft_step"`` (the engine's per-pass history dict, plus model), ``"reused"`` and
#: ``"saved"`` (model, path), ``"evaluate"`` (done, total, desc).
EventFn = Callable[[str, dict], None]


@dataclass
class Transfer:
    """Result of :func:`transfer_matrix`.

    Attributes:
        report: the evaluation; rows = source models then ``random``, columns = models.
        perturbations: ``{row name: v}`` (C×H×W tensors), the random row included.
        crafted: ``{source model: Perturbation}`` as returned by the engine (or loaded back).
        reused: names of the sources whose perturbation was loaded from ``out_dir``.
    """

    report: Report
    perturbations: dict[str, torch.Tensor]
    crafted: dict[str, Perturbation] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)


def tensor_fingerprint(x: torch.Tensor) -> str:
    """SHA-256 of a tensor's shape, dtype and bytes (identifies a crafting set)."""
    t = x.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over a model's state dict (names, shapes, bytes): changes when it is retrained."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor_fingerprint(t).encode())
    return h.hexdigest()


def _settings(source: str, model_id: str, model: nn.Module, x_craft_sha: str, n_craft: int,
              eps: float, norm: float, delta: float, max_passes: int, method: str, seed: int,
              craft_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "source": source,
        "model_id": model_id,
        "model_sha256": model_fingerprint(model),
        "eps": float(eps),
        "norm": norm_name(norm),
        "delta": float(delta),
        "max_passes": int(max_passes),
        "method": method,
        "seed": int(seed),
        "n_craft": int(n_craft),
        "craft_set_sha256": x_craft_sha,
        "craft_kwargs": json.loads(json.dumps(dict(craft_kwargs), default=str)),
    }


def _try_reuse(stem: Path, settings: dict[str, Any]) -> Perturbation | None:
    """The perturbation saved at ``stem`` if its settings equal ``settings``, else None."""
    settings_path = stem.with_name(stem.name + ".settings.json")
    if not settings_path.is_file():
        return None
    try:
        saved = json.loads(settings_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if saved != settings:
        return None
    try:
        return Perturbation.load(stem)
    except (OSError, ValueError, KeyError):
        return None  # damaged files: craft again


def _partial_stem(stem: Path) -> Path:
    return stem.with_name(stem.name + ".partial")


def _save_partial(stem: Path, settings: dict[str, Any], v: torch.Tensor, history: list[dict],
                  model_id: str, n_craft: int) -> None:
    """Checkpoint an unfinished crafting run after a pass (for ``craft(resume=...)``)."""
    pert = Perturbation(v=v.detach().cpu().float(), model=model_id, data=f"{n_craft} crafting images",
                        eps=settings["eps"], norm=settings["norm"], delta=settings["delta"],
                        method=settings["method"], seed=settings["seed"], history=[dict(h) for h in history],
                        seconds=sum(float(h.get("seconds", 0.0)) for h in history))
    _save(pert, _partial_stem(stem), settings)


def _remove(stem: Path) -> None:
    for suffix in (".settings.json", ".safetensors", ".json"):
        stem.with_name(stem.name + suffix).unlink(missing_ok=True)


def _save(pert: Perturbation, stem: Path, settings: dict[str, Any]) -> None:
    """Save the perturbation, then (atomically) the settings file that marks it complete."""
    settings_path = stem.with_name(stem.name + ".settings.json")
    settings_path.unlink(missing_ok=True)  # invalidate first: a crash mid-save must not look complete
    stem.parent.mkdir(parents=True, exist_ok=True)
    pert.save(stem)
    atomic_write(settings_path, json.dumps(settings, indent=2) + "\n")


def transfer_matrix(
    models: Mapping[str, nn.Module] | Sequence[nn.Module],
    x_craft: torch.Tensor,
    x_eval: torch.Tensor,
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
    random_baseline: bool = True,
    batch_size: int = 250,
    embeddings: bool = True,
    classes: Sequence[str] | None = None,
    craft_kwargs: Mapping[str, Any] | None = None,
    callback: EventFn | None = None,
) -> Transfer:
    """Craft one UAP per source model and evaluate every UAP on every model.

    Args:
        models: ``{name: target}`` — the columns, and by default also the sources (rows).
        x_craft: images the UAPs are crafted on (in [0, 1]), shared by all sources.
        x_eval: held-out images all cells are measured on; must not be ``x_craft``.
        y_eval: labels of ``x_eval`` (for accuracies), optional.
        eps, norm, delta, max_passes, method, seed: passed to :func:`uap.craft` for every
            source — the same budget, stop rule and seed for all rows.
        sources: which models to craft on (default: all of ``models``).
        model_ids: ``{name: id}`` recorded in the resume settings (e.g. zoo name or path).
        out_dir: where crafted perturbations are saved and, on a re-run, reused.
        random_baseline: add the ``random`` row (random noise with the same ℓp norm as the
            crafted UAPs: the largest of their norms, i.e. ε when they saturate the budget).
        batch_size, embeddings, classes: passed to :func:`uap.evaluate`.
        craft_kwargs: extra keyword arguments for :func:`uap.craft`.
        callback: ``callback(event, info)`` for progress (see :data:`EventFn`).
    """
    named = as_named_models(models)
    p = check_norm(norm)
    eps = check_eps(eps)
    sources = list(named) if sources is None else [str(s) for s in sources]
    unknown = [s for s in sources if s not in named]
    if unknown:
        raise ValueError(f"source model(s) {unknown} are not among the models {list(named)}")
    if not sources:
        raise ValueError("no source models to craft on")
    if random_baseline and RANDOM_ROW in named:
        raise ValueError(f"a model is named {RANDOM_ROW!r}, which is reserved for the random-noise row")
    for name, t in (("x_craft", x_craft), ("x_eval", x_eval)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or len(t) == 0:
            raise ValueError(f"{name} must be a non-empty N×C×H×W tensor of images")
    if x_craft.shape[1:] != x_eval.shape[1:]:
        raise ValueError(f"x_craft images are {tuple(x_craft.shape[1:])} but x_eval images are {tuple(x_eval.shape[1:])}")
    if x_craft is x_eval:
        raise ValueError("x_eval must be held-out images, not the crafting set itself")
    craft_kwargs = dict(craft_kwargs or {})
    clash = sorted(set(craft_kwargs) & _SET_HERE)
    if clash:
        raise ValueError(f"craft_kwargs cannot set {clash}: transfer_matrix sets them for every source")
    model_ids = dict(model_ids or {})
    emit = callback or (lambda _event, _info: None)
    stem_dir = Path(out_dir) / "perturbations" if out_dir is not None else None
    craft_sha = tensor_fingerprint(x_craft)
    if stem_dir is not None:
        bad = [s for s in sources if not s or "/" in s or "\\" in s or s.startswith(".")]
        if bad:
            raise ValueError(f"model name(s) {bad} cannot name files under {stem_dir}; rename them")

    crafted: dict[str, Perturbation] = {}
    reused: list[str] = []
    for k, source in enumerate(sources):
        settings = _settings(source, model_ids.get(source, source), named[source], craft_sha, len(x_craft),
                             eps, p, delta, max_passes, method, seed, craft_kwargs)
        stem = stem_dir / source if stem_dir is not None else None
        saved = _try_reuse(stem, settings) if stem is not None else None
        if saved is not None:
            crafted[source] = saved
            reused.append(source)
            emit("reused", {"model": source, "path": str(stem), "index": k, "total": len(sources)})
            continue
        crafted[source] = _craft_one(named[source], x_craft, x_eval, y_eval, settings, stem, craft_kwargs,
                                     emit, index=k, total=len(sources))

    perturbations: dict[str, torch.Tensor] = {s: _vector(crafted[s]) for s in sources}
    meta: dict[str, Any] = {
        "eps": eps, "norm": norm_name(p), "delta": delta, "max_passes": max_passes, "method": method,
        "seed": seed, "n_craft": len(x_craft), "n_eval": len(x_eval), "sources": sources,
        "reused": reused, "model_ids": {m: model_ids.get(m, m) for m in named},
    }
    if random_baseline:
        random_norm = max(float(lp_norm(v, p)) for v in perturbations.values())
        if random_norm > 0:
            perturbations[RANDOM_ROW] = random_perturbation(x_eval.shape[1:], random_norm, p, seed=seed)
            meta["random_norm"] = random_norm

    def on_eval(done: int, total: int, desc: str) -> None:
        emit("evaluate", {"done": done, "total": total, "desc": desc})

    report = evaluate(perturbations, named, x_eval, y_eval, batch_size=batch_size, embeddings=embeddings,
                      classes=classes, progress=on_eval, meta=meta)
    return Transfer(report=report, perturbations=perturbations, crafted=crafted, reused=reused)


def _craft_one(model: nn.Module, x_craft: torch.Tensor, x_eval: torch.Tensor, y_eval: torch.Tensor | None,
               settings: dict[str, Any], stem: Path | None, craft_kwargs: dict[str, Any], emit: EventFn,
               *, index: int, total: int) -> Perturbation:
    """Craft one source's UAP with :func:`uap.craft`, continuing from a checkpoint under ``stem``
    if there is one, checkpointing after every pass, and saving the result."""
    source = settings["source"]
    partial = _try_reuse(_partial_stem(stem), settings) if stem is not None else None
    emit("craft", {"model": source, "index": index, "total": total,
                   "resumed_passes": partial.passes if partial is not None else 0})
    history: list[dict] = [dict(h) for h in partial.history] if partial is not None else []

    def on_step(entry: dict) -> None:
        if entry.get("event") == "pass" and stem is not None:
            history.append({k: v for k, v in entry.items() if k not in ("event", "v")})
            _save_partial(stem, settings, entry["v"], history, settings["model_id"], len(x_craft))
        emit("craft_step", {**entry, "model": source})

    pert = universal.craft(
        model, x_craft, eps=settings["eps"], norm=settings["norm"], delta=settings["delta"],
        max_passes=settings["max_passes"], method=settings["method"], seed=settings["seed"],
        heldout=x_eval if y_eval is None else (x_eval, y_eval), callback=on_step, resume=partial,
        model_id=settings["model_id"], data=f"{len(x_craft)} crafting images", **craft_kwargs,
    )
    if stem is not None:
        _save(pert, stem, settings)
        _remove(_partial_stem(stem))
        emit("saved", {"model": source, "path": str(stem)})
    return pert


def _vector(pert: Any) -> torch.Tensor:
    v = pert.v if hasattr(pert, "v") else pert
    return v.detach().float().cpu()
