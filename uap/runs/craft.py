"""Crafting into a run folder: :func:`craft_in` (what :meth:`RunFolder.craft` does),
:func:`craft_run` (``uap craft --out``), the run's summary and its held-out baseline."""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from uap import universal
from uap.atomic import atomic_write
from uap.distributed import alone, is_main
from uap.perturbation import Perturbation
from uap.runs.decisions import decide_everywhere
from uap.runs.folder import Artefacts, Callback, RunFolder
from uap.runs.record import craft_arguments, fingerprint

__all__ = ["RunResult", "craft_in", "craft_run", "summarize", "stop_reason", "SUMMARY_FILE"]

#: Name of the summary :func:`craft_run` writes into its folder.
SUMMARY_FILE = "summary.json"


def summarize(pert: Perturbation, record: Mapping[str, Any], *,
              perturbation_file: str = "perturbation.safetensors") -> dict[str, Any]:
    """The summary of a finished run, as ``uap craft`` prints it and writes ``summary.json``.

    Fields: model, data, image counts, budget and method as asked (``record["craft"]``), the
    rates of the kept ``v`` (the last pass, or the best with ``keep_best``), its norms, the
    number of passes, why crafting stopped (``stopped``, :func:`stop_reason`), the method's
    counters summed over the passes (``counters``, e.g. ``{"deepfool_calls": N}``), time, the
    caller's settings and the history; the start (``init``) when it was not ``v = 0``, and for
    an ensemble the model ids (``models``) and each model's rates (``heldout_fooling_rates`` …).
    """
    from uap import __version__

    craft = record.get("craft", {})
    kept = pert.record  # the pass that produced v: the last one, or the best with keep_best
    norms = pert.norms()
    return {
        "model": pert.model, "data": pert.data, "n_images": pert.extra.get("n_images"),
        "heldout": pert.extra.get("n_heldout") or 0,
        "eps": pert.eps, "norm": pert.norm, "delta": pert.delta, "method": craft.get("method", pert.method),
        "seed": pert.seed, "passes": pert.passes, "seconds": pert.seconds,
        "best_pass": pert.extra.get("best_pass"), "stopped": stop_reason(pert),
        "fooling_rate": pert.fooling_rate, "heldout_fooling_rate": pert.heldout_fooling_rate,
        "heldout_accuracy": kept.get("heldout_accuracy"),
        "target": pert.extra.get("target"),
        "targeted_success_rate": kept.get("targeted_success_rate"),
        "heldout_targeted_success_rate": kept.get("heldout_targeted_success_rate"),
        "clean_heldout_accuracy": pert.extra.get("clean_heldout_accuracy"),
        "norm_2": norms["norm_2"], "norm_inf": norms["norm_inf"],
        "counters": {name: sum(int(r.get(name, 0)) for r in pert.history) for name in pert.extra.get("counters", [])},
        "perturbation": perturbation_file, "version": __version__,
        "settings": record.get("settings"), "history": pert.history,
        **({"init": pert.extra["init"]} if pert.extra.get("init") is not None else {}),
        **({"models": pert.extra["models"], **{key: kept.get(key) for key in _PER_MODEL}}
           if pert.extra.get("models") else {}),
    }


#: The per-model rates of an ensemble's records (``{model id: rate}``) that its summary repeats.
_PER_MODEL = ("fooling_rates", "heldout_fooling_rates", "heldout_accuracies")


def stop_reason(pert: Perturbation) -> dict[str, Any]:
    """Why crafting stopped: ``{"reason", "pass", "text"}`` with ``reason`` one of ``"delta"`` (the
    stop rule's rate exceeded 1 − δ after pass ``pass``), ``"max_passes"`` (all passes ran) or
    ``"callback"`` (a caller stopped it after pass ``pass``); ``text`` says it in one line."""
    history = pert.history or [{}]
    last = history[-1]
    key = "targeted_success_rate" if pert.extra.get("target") is not None else "fooling_rate"
    rate, k, most = last.get(key), len(pert.history), pert.extra.get("max_passes")
    name = "targeted success rate" if key != "fooling_rate" else "fooling rate"
    if rate is not None and rate > 1 - pert.delta:
        return {"reason": "delta", "pass": k, "text": f"{name} {100 * rate:.1f} % > 1 − δ = {100 * (1 - pert.delta):.0f} % "
                f"after pass {k}" + (f" (of at most {most})" if most else "")}
    if rate is None and pert.extra.get("n_images") == 0 and (most is None or k >= most):
        return {"reason": "max_passes", "pass": k, "text": f"all {k} passes ran (--max-passes): without crafting "
                "images there is no fooling rate for the stop rule"}
    if most is None or k >= most:
        return {"reason": "max_passes", "pass": k, "text": f"all {k} passes ran (--max-passes); {name} "
                + (f"{100 * rate:.1f} %" if rate is not None else "–") + f" ≤ 1 − δ = {100 * (1 - pert.delta):.0f} %"}
    return {"reason": "callback", "pass": k, "text": f"stopped by the caller after pass {k} of at most {most}"}


@dataclass
class RunResult:
    """What a run gave: its perturbation, its record, and how it was obtained.

    Attributes:
        perturbation: the finished perturbation (``extra["run"]`` holds the record).
        record: see :func:`uap.runs.fingerprint`.
        run: the folder.
        reused: True when the folder already held this finished run (nothing was crafted).
        resumed_passes: passes taken over from a checkpoint (0: crafted from scratch).
    """

    perturbation: Perturbation
    record: dict[str, Any]
    run: RunFolder
    reused: bool = False
    resumed_passes: int = 0
    baseline: dict[str, Any] | None = None  # craft_run: the strongest data-free baseline, held out

    @property
    def summary(self) -> dict[str, Any]:
        """:func:`summarize` of this run (with the held-out baseline when :func:`craft_run` measured it)."""
        summary = summarize(self.perturbation, self.record, perturbation_file=self.run.result_path.name)
        return {**summary, "baseline": self.baseline} if self.baseline is not None else summary


def craft_in(run: RunFolder, model: nn.Module, x: torch.Tensor, *, settings: Mapping[str, Any] | None = None,
             heldout: Any = None, callback: Callback | None = None, resume: bool = False, force: bool = False,
             replace: bool = False, artefacts: Artefacts | None = None, **craft_kwargs: Any) -> RunResult:
    """Reuse, continue or craft the run ``run`` with :func:`uap.craft`, checkpointing every pass.

    Args:
        run: the folder.
        model, x: the target and the crafting images.
        settings: the caller's description of the run, part of its record.
        heldout: passed to :func:`uap.craft` (and fingerprinted).
        callback: ``callback(event)`` gets :func:`uap.craft`'s events (``"progress"``,
            ``"pass"``: returning True from the latter stops after that pass, which is
            then checkpointed) and the run's own: ``{"event": "reused", "path", "passes"}``,
            ``{"event": "start", "resumed_passes", "checkpoint"}`` (crafting begins;
            ``checkpoint`` is the path resumed from, or None) and
            ``{"event": "saved", "path"}``.
        resume, force, replace: see :mod:`uap.runs.decisions`.
        artefacts: writes extra files of a finished run (see :meth:`RunFolder.finish`).
        **craft_kwargs: :func:`uap.craft`'s keyword arguments (``eps`` …).

    Raises :class:`RunLocked` if another process writes this run, and
    :class:`SettingsMismatch`, :class:`UnfinishedRun` or :class:`RunError` when the
    folder's contents forbid it.
    """
    args = craft_arguments(craft_kwargs)
    record = fingerprint(model, x, settings=settings, craft=args, heldout=heldout)
    emit = callback or (lambda _event: None)
    main = is_main()  # under torch.distributed only rank 0 locks, decides and writes
    with run.lock() if main else contextlib.nullcontext():
        action, found = decide_everywhere(run, record, resume=resume, force=force, replace=replace)
        if action == "reuse":
            assert found is not None
            emit({"event": "reused", "path": str(run.result_path), "passes": found.passes})
            return RunResult(found, record, run, reused=True)
        start = found if action == "resume" else None
        history = [dict(h) for h in start.history] if start is not None else []
        replacing = start is None  # the old files go when the new run first writes (see decisions)
        emit({"event": "start", "resumed_passes": len(history),
              "checkpoint": str(run.checkpoint_path) if start is not None else None})
        described = {name: args[name] for name in ("model_id", "data", "eps", "norm", "delta", "method", "seed")}

        def on_event(event: dict) -> Any:
            nonlocal replacing
            if event.get("event") == "pass" and main:  # checkpoint first: the callback may stop or raise
                if replacing:
                    run.discard()
                    replacing = False
                history.append({k: v for k, v in event.items() if k not in ("event", "v")})
                run.save_checkpoint(universal.perturbation(
                    event["v"], model, x, **described, history=list(history),
                    seconds=sum(float(h.get("seconds", 0.0)) for h in history), extra={"run": record}))
            return emit(event)

        start_from = {"init": craft_kwargs.get("init")}  # the record holds its description; craft takes it as given
        pert = universal.craft(model, x, heldout=heldout, callback=on_event, resume=start, **{**args, **start_from})
        if main:
            run.finish(pert, record, artefacts)
            emit({"event": "saved", "path": str(run.result_path)})
        return RunResult(pert, record, run, resumed_passes=len(start.history) if start is not None else 0)


def craft_run(out_dir: str | os.PathLike | RunFolder, model: nn.Module, x: torch.Tensor, *,
              settings: Mapping[str, Any] | None = None, heldout: Any = None, resume: bool = False,
              force: bool = False, callback: Callback | None = None, **craft_kwargs: Any) -> RunResult:
    """What ``uap craft --out`` does: craft a UAP into a run folder, or reuse / continue the run there.

    Writes ``perturbation.safetensors`` + ``perturbation.json``, ``perturbation.png`` (``v``
    scaled to [0, 255], as in Fig. 4 of the paper) and ``summary.json`` (:func:`summarize`),
    then the marker ``perturbation.settings.json``; a checkpoint
    ``perturbation.partial.*`` exists while crafting. ``out_dir`` may be a
    :class:`RunFolder` (e.g. one whose lock the caller already holds).

    Args:
        out_dir: the folder (created if needed).
        model, x: target and crafting images.
        settings: the caller's description of the run (stored in the record and the summary).
        heldout, callback, resume, force: see :meth:`RunFolder.craft`.
        **craft_kwargs: :func:`uap.craft`'s keyword arguments (``eps``, ``norm`` …).

    Returns the :class:`RunResult` (``.summary`` is what ``summary.json`` holds).
    """
    run = out_dir if isinstance(out_dir, RunFolder) else RunFolder(out_dir)

    measured: dict[str, Any] = {}

    def write_artefacts(folder: RunFolder, pert: Perturbation) -> None:
        pert.to_png(folder.path(".png"))
        measured["baseline"] = _heldout_baseline(model, heldout, pert)
        summary = summarize(pert, pert.extra["run"], perturbation_file=folder.result_path.name)
        atomic_write(folder.folder / SUMMARY_FILE,
                     json.dumps({**summary, "baseline": measured["baseline"]}, indent=2) + "\n")

    result = run.craft(model, x, settings=settings, heldout=heldout, callback=callback, resume=resume, force=force,
                       artefacts=write_artefacts, **craft_kwargs)
    if result.reused:  # measured when the run finished
        try:
            measured["baseline"] = json.loads((run.folder / SUMMARY_FILE).read_text(encoding="utf-8")).get("baseline")
        except (OSError, ValueError, AttributeError):
            pass
    result.baseline = measured.get("baseline")
    _check_heldout_accuracy(result.perturbation, heldout)
    return result


def _check_heldout_accuracy(pert: Perturbation, heldout: Any) -> None:
    """:func:`uap.evaluate.check_clean_accuracy` on the run's clean held-out accuracy (labelled
    held-out images only): a warning, nothing else."""
    from uap.evaluate import check_clean_accuracy

    accuracy = pert.extra.get("clean_heldout_accuracy")
    labels = heldout[1] if isinstance(heldout, (tuple, list)) and len(heldout) == 2 else None
    if accuracy is not None and torch.is_tensor(labels) and len(labels):
        check_clean_accuracy(float(accuracy), len(torch.unique(labels)), len(labels), pert.model)


def _heldout_baseline(model: nn.Module, heldout: Any, pert: Perturbation) -> dict[str, Any] | None:
    """The strongest data-free baseline at the run's budget on its held-out images (None without
    them), for the summary: the number a crafted UAP should be read against. Rank 0 alone."""
    from uap.baselines import strongest_baseline

    if heldout is None:
        return None
    hx, hy = heldout if isinstance(heldout, (tuple, list)) else (heldout, None)
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    with alone():
        found = [strongest_baseline(m, hx, pert.eps, pert.p, y=hy, seed=pert.seed) for m in models]
    if len(found) == 1:
        return {"name": found[0]["name"], "heldout_fooling_rate": found[0]["fooling_rate"],
                "heldout_accuracy": found[0]["accuracy"], "heldout_fooling_rates": found[0]["rates"]}
    # an ensemble: each model's strongest row, and their mean (what the mean rate is read against)
    accuracies = [f["accuracy"] for f in found]
    return {"name": "each model's strongest", "heldout_fooling_rate": sum(f["fooling_rate"] for f in found) / len(found),
            "heldout_accuracy": None if None in accuracies else sum(accuracies) / len(accuracies),
            "models": {name: {"name": f["name"], "heldout_fooling_rate": f["fooling_rate"]}
                       for name, f in zip(pert.extra.get("models", []), found)}}
