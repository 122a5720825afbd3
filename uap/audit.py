"""``audit``: a fixed, versioned protocol for a model's worst-case robustness to universal perturbations.

Per-image attacks have AutoAttack: one versioned ensemble, one report, the worst case over
attacks. :func:`audit` is that for UAPs. For each model, at one budget (ε, p):

- every attack of the protocol (:data:`PROTOCOLS`) crafts a perturbation on the crafting
  images — the ascent methods (SGD-UAP, also from a chessboard start, and SGA), Algorithm 1's
  batched form, the label-free Cos-UAP and, for models with an encoder, the feature UAP — or
  without them (GD-UAP with its range prior), each a run folder that a later audit with the same settings reuses
  (``out_dir/runs/<model>/<attack>``, continued after an interruption);
- every baseline (:mod:`uap.baselines`: noise, chessboards, and, in the full protocol, the
  Fourier-basis search on the crafting images) is built at the same budget;
- each is measured on the held-out images: fooling rate (with its 95 % Wilson interval) and
  accuracy under ``v``; the **worst case** is the highest fooling rate and the lowest accuracy
  over all of them, with the attack that gave each.

The protocol's name and version, and every setting, are in the result's JSON, so a number
from an audit can be reproduced by naming them. Under ``torch.distributed`` each crafting run
and each evaluation is the one-process run (the engine's guarantee), so the audit is too.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from uap.baselines import parse_baselines
from uap.evaluate import as_named_models, baselines_at_budget, evaluate
from uap.forward import DEFAULT_BATCH_SIZE, encoder_of
from uap.images import Images, is_images
from uap.methods import make_method
from uap.projection import check_eps, check_norm, norm_name
from uap.report import Report
from uap.runs import RunFolder

__all__ = ["Attack", "Protocol", "PROTOCOLS", "audit", "Audit"]


@dataclass(frozen=True)
class Attack:
    """One crafting attack of a protocol: ``method`` with ``options`` for at most ``passes``
    passes (stop rule δ), started from ``init`` (a baseline name, see :func:`uap.craft`), on
    models with an encoder only when ``needs_encoder``."""

    name: str
    method: str
    passes: int
    delta: float = 0.0
    options: Mapping[str, Any] = field(default_factory=dict)
    needs_encoder: bool = False
    init: str | None = None

    def settings(self) -> dict[str, Any]:
        return {"method": self.method, "max_passes": self.passes, "delta": self.delta, "init": self.init,
                "method_options": dict(self.options), "needs_encoder": self.needs_encoder}


@dataclass(frozen=True)
class Protocol:
    """A named, versioned list of attacks and the baselines measured beside them."""

    name: str
    version: str
    attacks: tuple[Attack, ...]
    baselines: str
    description: str

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "baselines": self.baselines,
                "attacks": {a.name: a.settings() for a in self.attacks}, "description": self.description}


def _attacks(sgd: int, from_chessboard: int, sga: int, deepfool: int, cos: int, feature: int, gd: int
             ) -> tuple[Attack, ...]:
    """The protocols' attacks, with these passes each (deepfool-batched stops at δ = 0.2)."""
    return (Attack("sgd", "sgd", sgd), Attack("sgd-from-chessboard", "sgd", from_chessboard, init="chessboard2n"),
            Attack("sga", "sga", sga), Attack("deepfool-batched", "deepfool-batched", deepfool, delta=0.2),
            Attack("cos-uap", "cos-uap", cos), Attack("feature", "feature", feature, needs_encoder=True),
            Attack("gd-uap", "gd-uap", gd, options={"prior": "range"}))


#: The protocols. ``standard`` is the one to report; ``quick`` trades strength for time and says so.
PROTOCOLS: dict[str, Protocol] = {
    "standard": Protocol(
        "standard", "1", _attacks(10, 5, 5, 3, 10, 10, 5), "all",
        "sgd (10 passes; and 5 from the 2-pixel chessboard), sga (5), deepfool-batched (≤3, δ=0.2), cos-uap "
        "(10), feature (10; models with an encoder), gd-uap with the range prior (5, no data); every baseline "
        "including the Fourier-basis search"),
    "quick": Protocol(
        "quick", "1", _attacks(3, 2, 2, 1, 3, 3, 2), "data-free",
        "as standard with fewer passes (sgd 3 and 2 from the chessboard, sga 2, deepfool-batched 1, cos-uap 3, "
        "feature 3, gd-uap 2) and no Fourier search: a cheaper lower bound on the standard audit's worst case"),
}

#: ``callback(event, info)``: ``"craft"`` (model, attack, index, total), ``"craft_step"`` (the
#: engine's event plus model and attack), ``"evaluate"`` (model).
EventFn = Callable[[str, dict], None]


@dataclass
class Audit:
    """Result of :func:`audit`.

    Attributes:
        protocol: the protocol's settings (name, version, attacks, baselines).
        reports: ``{model: Report}`` — one column each; rows = the model's attacks, then the baselines.
        perturbations: ``{model: {row: v}}``.
        meta: the budget, image counts, seed.
    """

    protocol: dict[str, Any]
    reports: dict[str, Report]
    perturbations: dict[str, dict[str, torch.Tensor]]
    meta: dict[str, Any]

    def rows(self, model: str) -> list[dict[str, Any]]:
        """One dict per attack and baseline of ``model``: fooling rate, its interval, accuracy under v."""
        report = self.reports[model]
        out = []
        for row in report.perturbations:
            cell = report.cell(row, model)
            low, high = report.interval(row, model)
            out.append({"model": model, "attack": row, "kind": "baseline" if report.is_baseline(row) else "crafted",
                        "fooling_rate": cell["fooling_rate"], "fooling_rate_low": low, "fooling_rate_high": high,
                        "accuracy": cell["accuracy"], "clean_accuracy": cell["clean_accuracy"]})
        return out

    def worst(self, model: str) -> dict[str, Any]:
        """The highest fooling rate and the lowest accuracy under ``v`` over every row, with their rows."""
        rows = self.rows(model)
        fooled = max(rows, key=lambda r: r["fooling_rate"])
        accurate = [r for r in rows if r["accuracy"] == r["accuracy"]]
        lowest = min(accurate, key=lambda r: r["accuracy"]) if accurate else None
        return {"fooling_rate": fooled["fooling_rate"], "fooling_attack": fooled["attack"],
                "fooling_rate_low": fooled["fooling_rate_low"], "fooling_rate_high": fooled["fooling_rate_high"],
                "accuracy": lowest["accuracy"] if lowest else math.nan,
                "accuracy_attack": lowest["attack"] if lowest else None,
                "clean_accuracy": rows[0]["clean_accuracy"] if rows else math.nan}

    def to_dict(self) -> dict[str, Any]:
        def clean(x: Any) -> Any:
            return None if isinstance(x, float) and x != x else x

        return {"protocol": self.protocol, "meta": self.meta,
                "models": {m: {"worst": {k: clean(v) for k, v in self.worst(m).items()},
                               "rows": [{k: clean(v) for k, v in r.items()} for r in self.rows(m)]}
                           for m in self.reports}}

    def to_csv(self) -> str:
        import csv
        import io

        buf = io.StringIO()
        columns = ["model", "attack", "kind", "fooling_rate", "fooling_rate_low", "fooling_rate_high", "accuracy",
                   "clean_accuracy"]
        writer = csv.DictWriter(buf, columns, lineterminator="\n")
        writer.writeheader()
        for m in self.reports:
            for r in self.rows(m):
                writer.writerow({k: "" if isinstance(v, float) and v != v else v for k, v in r.items()})
        return buf.getvalue()

    def save(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write ``audit.json``, ``audit.csv`` and the bar chart ``audit.png`` (atomically). Under
        ``torch.distributed`` rank 0 writes; the others write nothing and get ``[]``."""
        import json

        from uap import distributed
        from uap.atomic import atomic_write
        from uap.plots import plot_audit

        if not distributed.is_main():
            return []
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "audit.json", json.dumps(self.to_dict(), indent=2, allow_nan=False))
        atomic_write(out / "audit.csv", self.to_csv())
        return [out / "audit.json", out / "audit.csv", plot_audit(self, out / "audit.png")]


def audit(
    models: Mapping[str, nn.Module] | Sequence[nn.Module],
    x_craft: torch.Tensor | Images,
    x_eval: torch.Tensor | Images,
    y_eval: torch.Tensor | None = None,
    *,
    eps: float,
    norm: float | int | str = math.inf,
    protocol: str | Protocol = "standard",
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    model_ids: Mapping[str, str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    classes: Sequence[str] | None = None,
    callback: EventFn | None = None,
) -> Audit:
    """Run ``protocol`` on every model at the budget (``eps``, ``norm``).

    Args:
        models: ``{name: target}`` (or a sequence) — each audited on its own.
        x_craft: crafting images in [0, 1]; every attack and the Fourier search use them.
        x_eval, y_eval: held-out images (never ``x_craft``) and their labels (for accuracies).
        eps, norm: the budget of every attack and baseline.
        protocol: a name of :data:`PROTOCOLS` or a :class:`Protocol`.
        seed: of the crafting runs and the baselines.
        out_dir: where each crafting run is kept (``runs/<model>/<attack>``) and reused or
            continued by a later audit with the same settings; None: nothing is written.
        model_ids: ``{name: id}`` recorded in each run (e.g. the model spec).
        batch_size, classes: for the evaluation (:func:`uap.evaluate`).
        callback: progress events (:data:`EventFn`).
    """
    named = as_named_models(models)
    chosen = PROTOCOLS.get(protocol) if isinstance(protocol, str) else protocol
    if chosen is None:
        raise ValueError(f"unknown audit protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    p = check_norm(norm)
    eps = check_eps(eps, p)
    for name, t in (("x_craft", x_craft), ("x_eval", x_eval)):
        if not (isinstance(t, torch.Tensor) or is_images(t)) or t.dim() != 4 or len(t) == 0:
            raise ValueError(f"{name} must be a non-empty N×C×H×W tensor (or uap.images.Images) of images")
    if x_craft is x_eval:
        raise ValueError("x_eval must be held-out images, not the crafting set itself")
    for attack in chosen.attacks:
        make_method(attack.method, attack.options)  # an unknown method or option fails before any work
    parse_baselines(chosen.baselines)
    if is_images(x_craft):
        x_craft = x_craft.tensor()
    emit = callback or (lambda _event, _info: None)
    model_ids = dict(model_ids or {})
    heldout = x_eval if y_eval is None else (x_eval, y_eval)
    reports: dict[str, Report] = {}
    perturbations: dict[str, dict[str, torch.Tensor]] = {}
    for name, model in named.items():
        attacks = [a for a in chosen.attacks if not a.needs_encoder or encoder_of(model) is not None]
        crafted: dict[str, torch.Tensor] = {}
        for k, attack in enumerate(attacks):
            emit("craft", {"model": name, "attack": attack.name, "index": k, "total": len(attacks)})
            args = dict(eps=eps, norm=p, delta=attack.delta, max_passes=attack.passes, method=attack.method,
                        method_options=dict(attack.options), seed=seed, model_id=model_ids.get(name, name),
                        data=f"{len(x_craft)} crafting images", init=attack.init)

            def on_event(event: dict, name: str = name, attack: Attack = attack) -> None:
                emit("craft_step", {**event, "model": name, "attack": attack.name})

            if out_dir is not None:
                run = RunFolder(Path(out_dir) / "runs" / _safe(name), attack.name).craft(
                    model, x_craft, settings={"audit": chosen.name, "version": chosen.version}, heldout=heldout,
                    callback=on_event, resume=True, replace=True, **args)
                pert = run.perturbation
            else:
                from uap.universal import craft

                pert = craft(model, x_craft, heldout=heldout, callback=on_event, **args)
            crafted[attack.name] = pert.v.detach().float().cpu()
        emit("evaluate", {"model": name})
        built = baselines_at_budget(chosen.baselines, x_eval.shape[1:], eps=eps, norm=p, models={name: model},
                                    x_craft=x_craft, seed=seed, batch_size=batch_size)
        rows = {row.split(":", 1)[0] if row.endswith(f":{name}") else row: v for row, v in built.perturbations.items()}
        reports[name] = evaluate(crafted, {name: model}, x_eval, y_eval, batch_size=batch_size, classes=classes,
                                 embeddings=False, baselines=rows, meta=built.meta())
        perturbations[name] = {**crafted, **rows}
    meta = {"eps": eps, "norm": norm_name(p), "seed": seed, "n_craft": len(x_craft), "n_eval": len(x_eval),
            "model_ids": {m: model_ids.get(m, m) for m in named}}
    return Audit(protocol=chosen.settings(), reports=reports, perturbations=perturbations, meta=meta)


def _safe(name: str) -> str:
    """A model name as one folder name (specs may hold ``:`` and ``/``)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
