"""Universal perturbations: the crafting driver, :func:`craft`.

Algorithm 1 of Moosavi-Dezfooli et al. (CVPR 2017)::

    v ← 0
    while Err(X_v) ≤ 1 − δ (and passes < max_passes):
        for x_i in X (shuffled):
            if k̂(x_i + v) = k̂(x_i):
                Δv_i ← argmin_r ‖r‖₂ s.t. k̂(x_i + v + r) ≠ k̂(x_i)      (DeepFool)
                v ← P_{p,ε}(v + Δv_i)                                   (if DeepFool converged)

:func:`craft` is the outer loop every method shares: validation, the visiting order, the stop
rule, the per-pass history record, the callback, resuming and keeping the best pass. What
happens *inside* one pass is a :class:`uap.methods.Method` (the ``for`` loop above is
:mod:`uap.methods.algorithm1`; ``sgd`` and ``feature`` are projected ascent instead), so the
driver has no per-method branches.

Methods attack the model through one copy per run with its batch norm folded into the
convolutions (:mod:`uap.fold`; the same function up to float rounding, checked before use),
unless ``fold_batchnorm=False``. Fooling rates (the stop rule and the history) are measured
on the model as given.

Visiting order: pass ``k`` (1-based) visits ``visiting_order(N, seed, k)``, a permutation
drawn from a generator seeded with ``(seed, k)`` only — so a resumed run and a reference
loop see the same order.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from uap import methods
from uap.criteria import Criterion, Targeted, Untargeted, check_target
from uap.distributed import broadcast
from uap.forward import DEFAULT_BATCH_SIZE, check_images, check_perturbation, eval_mode, logits_of, model_device
from uap.initial import Init, describe_init, initial_perturbation
from uap.methods.base import AttackedModels, Callback, CraftContext, Method
from uap.methods.ensemble import check_ensemble, ensemble_pass
from uap.metrics import clean_predictions, predict
from uap.perturbation import Perturbation
from uap.projection import check_eps, check_norm, lp_norm, norm_name

__all__ = ["craft", "crafted_models", "check_stop_rule", "check_eval_every", "visiting_order", "perturbation"]


def visiting_order(n: int, seed: int, pass_index: int) -> torch.Tensor:
    """The permutation of ``range(n)`` visited in pass ``pass_index`` (1-based) for ``seed``."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(pass_index))
    return torch.randperm(n, generator=g)


def check_stop_rule(delta: float, max_passes: int) -> None:
    """Validate the stop rule: ``0 ≤ delta < 1`` (0: run all ``max_passes`` passes)
    and ``max_passes`` an integer ≥ 1."""
    if isinstance(delta, bool) or not (isinstance(delta, (int, float)) and 0 <= delta < 1):
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    if not isinstance(max_passes, int) or isinstance(max_passes, bool) or max_passes < 1:
        raise ValueError(f"max_passes must be an integer ≥ 1, got {max_passes!r}")


def check_eval_every(eval_every: int) -> None:
    """Validate ``eval_every``: an integer ≥ 1 (1: measure the rates after every pass)."""
    if not isinstance(eval_every, int) or isinstance(eval_every, bool) or eval_every < 1:
        raise ValueError(f"eval_every must be an integer ≥ 1, got {eval_every!r}")


def craft(
    model: nn.Module | Sequence[nn.Module] | Mapping[str, nn.Module],
    x: torch.Tensor | None,
    *,
    eps: float,
    norm: float | int | str = math.inf,
    delta: float = 0.2,
    max_passes: int = 10,
    method: str | Method = "deepfool",
    seed: int = 0,
    heldout: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    callback: Callback | None = None,
    method_options: Mapping[str, Any] | None = None,
    resume: Perturbation | None = None,
    init: Init = None,
    model_id: str | Sequence[str] | None = None,
    data: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    target: int | None = None,
    keep_best: bool = False,
    fold_batchnorm: bool = True,
    eval_every: int = 1,
) -> Perturbation:
    """Craft a universal perturbation ``v`` with ``‖v‖_p ≤ eps`` that fools ``model`` on ``x``.

    Args:
        model: classifier on [0, 1] images (N×C×H×W → N×K logits); used in eval mode. A list of
            classifiers (or ``{id: classifier}``) crafts one ``v`` against all of them: the
            objective is the mean of the models' objectives (:mod:`uap.methods.ensemble`; the
            projected-ascent methods and ``gd-uap``), the stop rule reads the mean of their rates,
            and every record also holds each model's (``fooling_rates``,
            ``heldout_fooling_rates``, ``heldout_accuracies``: ``{model id: rate}``).
        x: the crafting set X (images in [0, 1]), or None for a method that needs none
            (``Method.needs_data`` false, e.g. ``gd-uap`` with prior none or range): then no rate
            on X is measured, the stop rule does not apply (all ``max_passes`` passes run) and
            the image shape comes from ``heldout``.
        eps: radius ε of the ℓp ball.
        norm: p ∈ {1, 2, inf} of the ball.
        delta: stop once the fooling rate on X exceeds ``1 − delta`` (0 ≤ δ < 1; 0 runs all
            ``max_passes`` passes, a fixed budget).
        max_passes: at most this many passes over X.
        method: a registered method name (``"deepfool"``, ``"deepfool-batched"``, ``"sgd"``,
            ``"feature"``, ``"foolbox:<Attack>"`` …; :func:`uap.methods.available_methods`) or a
            :class:`uap.methods.Method` object.
        seed: fixes the visiting order (see :func:`visiting_order`).
        heldout: images (or ``(images, labels)``) whose fooling rate (and accuracy under v)
            is recorded after the measured passes (``eval_every``); they never influence ``v``.
        callback: called with ``{"event": "progress", …}`` during a pass and with
            ``{"event": "pass", **record, "v": v}`` after each; returning ``True`` from the
            latter stops crafting after that pass.
        method_options: the method's options (its ``Options`` dataclass, e.g. ``batch_size``
            for ``deepfool-batched`` and ``sgd``, ``chunk_size`` for ``deepfool``, and the
            DeepFool methods' ``overshoot`` or ``precision``); unknown or ill-typed ones are a
            ``ValueError``.
        resume: a :class:`Perturbation` from an earlier, interrupted run with the same
            settings; crafting continues from its ``v`` and history.
        init: where ``v`` starts (:mod:`uap.initial`): None (``v = 0``), a registered baseline's
            name (``"chessboard2n"``, ``"fourier"`` …) built at the run's budget and seed, a
            perturbation file or run folder, a :class:`Perturbation` or a tensor, put into the ball
            by the exact projection; stored as ``extra["init"]``. A resumed run continues from
            ``resume`` whatever ``init`` says.
        model_id, data: descriptions stored in the result's metadata (``model_id``: a list of
            ids for several models; the metadata's ``model`` is then their comma-joined list and
            ``extra["models"]`` the list).
        batch_size: images per forward pass when measuring fooling rates.
        target: a class index for a targeted UAP (methods with ``supports_target``): the run's
            criterion is then :class:`uap.criteria.Targeted` (the stop rule uses the targeted
            success rate, and each record also holds ``targeted_success_rate`` and
            ``heldout_targeted_success_rate``); stored in the metadata.
        keep_best: return the ``v`` of the pass with the highest rate on X (the crafting set;
            held-out images are never used to choose) instead of the last pass's. Algorithm 1
            is not monotone: a pass can lower the fooling rate. The chosen pass is stored as
            ``extra["best_pass"]`` (0: no pass beat the starting ``v``); the history keeps
            every pass. Candidates are the starting ``v`` and the passes of this call.
        fold_batchnorm: attack a copy of the model (and of its encoder, for ``feature``) with
            batch norm folded into the layers before it (:func:`uap.fold_batchnorm`), the
            same function up to float rounding and faster to differentiate.
        eval_every: measure the rates (on X and on the held-out images) after every
            ``eval_every``-th pass and after the last one (the pass reaching ``max_passes`` or
            the stop rule; not a pass after which the callback stops crafting, unless it is
            due). With ``delta > 0`` the stop rule needs Err(X_v) after every pass, so the
            crafting set's rates are measured after each pass regardless. A pass not measured
            records None for its rates (``fooling_rate``, ``heldout_fooling_rate``,
            ``heldout_accuracy`` and the criterion's). A measured rate is the same number as
            with ``eval_every=1``: each is a function of ``v`` alone. With ``eval_every > 1``
            every record also holds ``measured`` (whether its held-out rates were measured);
            ``keep_best`` needs every pass's rate and refuses ``eval_every > 1``.

    Returns:
        A :class:`Perturbation` whose ``history`` has one record per pass with
        ``fooling_rate``, ``heldout_fooling_rate`` (None without ``heldout``, or on a pass
        ``eval_every`` leaves unmeasured), ``norm_2``,
        ``norm_inf``, ``visited``, the method's counters (:attr:`Method.counters`),
        ``updates`` and ``seconds``. ``extra`` holds what the method adds
        (:meth:`Method.describe`) and the names of its counters (``extra["counters"]``).
    """
    p = check_norm(norm)
    eps = check_eps(eps, p)
    check_stop_rule(delta, max_passes)
    models, names = crafted_models(model, model_id)
    pass_method = methods.make_method(method, method_options)
    if x is None:
        if pass_method.needs_data:
            changed = pass_method.options.changed()
            raise ValueError(f"method {pass_method.name!r}" + (f" with {changed}" if changed else "")
                             + " needs crafting images (x); give them, or options that need none")
    else:
        check_images(x, "x (the crafting set)")
    check_ensemble(pass_method, len(models))
    if target is not None and not pass_method.supports_target:
        raise ValueError(f"method {pass_method.name!r} is untargeted; give no target or use a method that takes one")
    if target is None and pass_method.requires_target:
        raise ValueError(f"method {pass_method.name!r} needs a target class (target=CLASS)")
    check_eval_every(eval_every)
    if keep_best and eval_every != 1:
        raise ValueError(f"keep_best compares every pass's fooling rate; it needs eval_every=1, got {eval_every}")
    if keep_best and x is None:
        raise ValueError("keep_best compares the passes' fooling rates on the crafting images; it needs x")
    attacked = AttackedModels(fold_batchnorm)
    hx, hy = _split_heldout(heldout, x)
    shape = _image_shape(x, hx, resume)

    device = _device_of(models)
    described = pass_method.describe(device)  # e.g. settings resolved for the device (a warning, once)
    history: list[dict] = []
    dtype = x.dtype if x is not None else torch.float32
    v = torch.zeros(shape, dtype=dtype, device=device)
    if resume is None:
        start, started_from = initial_perturbation(init, shape, eps, p, seed=seed, models=dict(zip(names, models)),
                                                   x_craft=x, batch_size=batch_size)
        v = v if start is None else start.to(device=device, dtype=dtype)
    else:
        started_from = describe_init(init)  # what a run that was not interrupted records
        v = check_perturbation(resume.v, torch.empty((0, *shape))).to(device=device, dtype=dtype)
        history = [dict(r) for r in resume.history]
        if lp_norm(v, p).item() > eps * (1 + 1e-5):
            raise ValueError(f"the perturbation to resume has ‖v‖_{norm_name(p)} > eps={eps:g}; settings differ?")

    started = time.perf_counter()
    with contextlib.ExitStack() as modes:
        for m in models:
            modes.enter_context(eval_mode(m))
        # no crafting images: an empty set (no pass visits it, no rate is read from it) and, to
        # check the batch-norm-folded copies on, a few seeded images of the data range
        cleans = None if x is None else [clean_predictions(m, x, batch_size=batch_size) for m in models]  # checks N×C
        xd = torch.zeros((0, *shape), dtype=dtype, device=device) if x is None else x.to(device)
        cleands = [torch.zeros(0, dtype=torch.long, device=device)] * len(models) if cleans is None else \
            [c.to(device) for c in cleans]
        example = None if x is not None else torch.rand((8, *shape), generator=torch.Generator().manual_seed(0)).to(device)
        held_cleans = None if hx is None else [clean_predictions(m, hx, batch_size=batch_size) for m in models]
        criterion: Criterion = Untargeted()
        if target is not None:
            with torch.no_grad():
                criterion = Targeted(check_target(target, logits_of(models[0], (xd if x is not None else example)[:1]).shape[1]))

        def stop_rate(v: torch.Tensor, fooling: float | None) -> float | None:
            """The rate the stop rule reads (``fooling``: Err(X_v), when measured already); None without X."""
            if x is None:
                return None
            return _mean([criterion.rate(m, x, v, clean=c, batch_size=batch_size, fooling=fooling)
                          for m, c in zip(models, cleans)])

        measured = resume.record if resume is not None else {}  # the record of the v we start from
        if criterion.key in measured:
            rate = measured[criterion.key]
        else:  # v = 0 leaves every image (checked to be in [0, 1]) as it is: no prediction changes
            rate = stop_rate(v, 0.0 if resume is None and init is None else None)
        best_pass = int(resume.extra.get("best_pass", len(history))) if resume is not None else 0
        best_rate, best_v = rate, v
        while (rate is None or rate <= 1 - delta) and len(history) < max_passes:  # None: not measured, δ = 0, or no X
            k = len(history) + 1
            t0 = time.perf_counter()
            ctx = CraftContext(
                model=models[0], x=xd, clean=cleands[0], v=v, eps=eps, p=p,
                order=visiting_order(xd.shape[0], seed, k).to(device), pass_index=k, method=pass_method,
                generator=torch.Generator().manual_seed(int(seed) * 1_000_003 + k + 7919),
                criterion=criterion, attacked=attacked, callback=callback,
                ensemble=tuple(zip(models, cleands)) if len(models) > 1 else (), example=example,
            )
            ensemble_pass(pass_method, ctx)
            ctx.progress(force=True)
            v = ctx.v.detach()
            due = k % eval_every == 0 or k == max_passes
            measure = x is not None and (due or delta > 0)
            preds = [predict(m, x, v, batch_size=batch_size) for m in models] if measure else None  # one forward serves all
            fooled = None if preds is None else [Untargeted().rate_of(pr, c) for pr, c in zip(preds, cleans)]
            rates = None if preds is None else [criterion.rate_of(pr, c) for pr, c in zip(preds, cleans)]
            rate = _mean(rates)
            due = due or (rate is not None and rate > 1 - delta)  # the stop rule ends crafting: the last pass
            helds = [predict(m, hx, v, batch_size=batch_size) for m in models] if due and hx is not None else None
            held_rates = None if helds is None else [Untargeted().rate_of(h, c) for h, c in zip(helds, held_cleans)]
            accuracies = None if helds is None or hy is None else [(h == hy.cpu()).sum().item() / len(h) for h in helds]
            record = {
                "pass": k,
                "fooling_rate": _mean(fooled),
                "heldout_fooling_rate": _mean(held_rates),
                "heldout_accuracy": _mean(accuracies),
                **({} if eval_every == 1 else {"measured": due}),
                "norm_2": lp_norm(v, 2).item(),
                "norm_inf": lp_norm(v, math.inf).item(),
                "visited": ctx.visited,
                **ctx.counters,
                "updates": ctx.updates,
                "seconds": time.perf_counter() - t0,
                **_criterion_record(criterion, rates, helds, len(models)),
                **(_per_model(names, fooling_rates=fooled, heldout_fooling_rates=held_rates,
                              heldout_accuracies=accuracies) if len(models) > 1 else {}),
            }
            history.append(record)
            if keep_best and rate > best_rate:  # keep_best: every pass measured
                best_rate, best_pass, best_v = rate, k, v
            stop = callback is not None and callback({"event": "pass", **record, "v": v.detach().cpu()}) is True
            if bool(broadcast(torch.tensor(stop))):  # under torch.distributed rank 0's callback decides for all
                break
    seconds = time.perf_counter() - started + (resume.seconds if resume is not None else 0.0)
    folded = attacked.folded_layers()
    clean_accuracies = None if hy is None else [(c == hy.cpu()).sum().item() / len(c) for c in held_cleans]
    extra: dict[str, Any] = {
        "n_images": 0 if x is None else int(x.shape[0]),
        "n_heldout": None if hx is None else int(hx.shape[0]),
        "method_options": dict(method_options or {}),
        "counters": list(pass_method.counters),
        "max_passes": max_passes,
        **({"batchnorm_folded": folded} if folded is not None else {}),  # BatchNorm layers attacked folded
        **criterion.describe(),
        **({"best_pass": best_pass} if keep_best else {}),
        "clean_heldout_accuracy": _mean(clean_accuracies),
        **({"init": started_from} if started_from is not None else {}),
        **({"models": names, **_per_model(names, clean_heldout_accuracies=clean_accuracies)} if len(models) > 1 else {}),
    }
    clash = sorted(set(described) & set(extra))
    if clash:
        raise ValueError(f"method {pass_method.name!r} describes itself with the reserved extra key(s) {clash}")
    extra.update(described)
    return perturbation(best_v if keep_best else v, models if len(models) > 1 else models[0], x,
                        model_id=names if len(models) > 1 else names[0], data=data, eps=eps, norm=p,
                        delta=delta, method=pass_method.name, seed=seed, history=history, seconds=seconds,
                        extra=extra)


def crafted_models(model: nn.Module | Sequence[nn.Module] | Mapping[str, nn.Module],
                   model_id: str | Sequence[str] | None = None) -> tuple[list[nn.Module], list[str]]:
    """The models a run crafts against and their ids: one model (its ``model_id``, default its class
    name), a sequence (``model_id`` a sequence of as many ids, default the class names, made
    unique with ``#2`` …) or a mapping ``{id: model}``."""
    from uap.saved import unique_name

    if isinstance(model, Mapping):
        if model_id is not None:
            raise ValueError("the models are given as {id: model}; give no model_id")
        model_id, model = list(model), list(model.values())
    if isinstance(model, (list, tuple)):
        if not model:
            raise ValueError("craft needs at least one model")
        ids = [None] * len(model) if model_id is None else model_id
        if isinstance(ids, str) or len(ids) != len(model):
            raise ValueError(f"model_id must be a list of {len(model)} ids for {len(model)} models, got {model_id!r}")
        models, given = list(model), list(ids)
    else:
        if model_id is not None and not isinstance(model_id, str):
            raise ValueError(f"model_id of one model is text, got {model_id!r}")
        models, given = [model], [model_id]
    if not all(isinstance(m, nn.Module) or callable(m) for m in models):
        raise ValueError("every model must be a classifier (an nn.Module taking images to logits)")
    names: dict[str, None] = {}
    for m, name in zip(models, given):
        names[unique_name(str(name) if name is not None else type(m).__name__, names)] = None
    return models, list(names)


def _mean(values: list[float] | None) -> float | None:
    """The mean of the models' rates (one model: its rate, exactly); None when not measured."""
    if values is None:
        return None
    return values[0] if len(values) == 1 else sum(values) / len(values)


def _per_model(names: list[str], **columns: list | None) -> dict[str, Any]:
    """``{column: {model id: value} or None}`` for an ensemble's record."""
    return {key: None if values is None else dict(zip(names, values)) for key, values in columns.items()}


def _criterion_record(criterion: Criterion, rates: list[float] | None, helds: list[torch.Tensor] | None,
                      n_models: int) -> dict[str, Any]:
    """The criterion's record entries; for an ensemble the mean of each model's."""
    if n_models == 1:
        return criterion.record_of(None if rates is None else rates[0], None if helds is None else helds[0])
    each = [criterion.record_of(None if rates is None else r, None if helds is None else h)
            for r, h in zip(rates or [None] * n_models, helds or [None] * n_models)]
    return {key: _mean(None if any(e[key] is None for e in each) else [e[key] for e in each]) for key in each[0]}


def _image_shape(x: torch.Tensor | None, hx: Any, resume: Perturbation | None) -> tuple[int, ...]:
    """One image's C×H×W: the crafting images', else the held-out ones', else the resumed ``v``'s."""
    if x is not None:
        return tuple(x.shape[1:])
    if hx is not None:
        return tuple(hx.shape[1:])
    if resume is not None:
        return tuple(resume.v.shape[-3:])
    raise ValueError("without crafting images the run needs held-out images to know the image shape")


def _device_of(models: list[nn.Module]) -> torch.device:
    """The device every model is on (one device for an ensemble)."""
    devices = {str(model_device(m)) for m in models}
    if len(devices) > 1:
        raise ValueError(f"the models are on different devices ({', '.join(sorted(devices))}); put them on one")
    return model_device(models[0])


def perturbation(v: torch.Tensor, model: nn.Module | Sequence[nn.Module], x: torch.Tensor | None, *,
                 model_id: str | Sequence[str] | None, data: str | None,
                 eps: float, norm: float | int | str, delta: float, method: str, seed: int, history: list[dict],
                 seconds: float, extra: dict[str, Any]) -> Perturbation:
    """The :class:`Perturbation` of a crafting run on ``model`` and ``x`` — its result, or the
    checkpoint a run folder writes after each pass — with the metadata filled in alike for both
    (``model_id`` and ``data`` default to the model's class name and the image count; several
    models' ids are joined by commas)."""
    if isinstance(model, (list, tuple)) or (model_id is not None and not isinstance(model_id, str)):
        model_id = ",".join(crafted_models(model, model_id)[1])
    return Perturbation(
        v=v.detach().cpu(), model=model_id or type(model).__name__,
        data=data or ("no crafting images" if x is None else f"{x.shape[0]} images"),
        eps=eps, norm=norm_name(norm), delta=float(delta), method=method, seed=int(seed),
        history=history, seconds=seconds, extra=extra,
    )


def _split_heldout(heldout, x: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if heldout is None:
        return None, None
    if isinstance(heldout, (tuple, list)):
        if len(heldout) != 2:
            raise ValueError("heldout must be images or an (images, labels) pair")
        hx, hy = heldout
    else:
        hx, hy = heldout, None
    check_images(hx, "heldout")
    if x is not None and tuple(hx.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(f"held-out images are {tuple(hx.shape[1:])}, crafting images {tuple(x.shape[1:])}")
    if hy is not None and (not torch.is_tensor(hy) or hy.shape != (hx.shape[0],)):
        raise ValueError(f"held-out labels must have shape ({hx.shape[0]},)")
    return hx, hy
