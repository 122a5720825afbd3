"""What a crafting run counts as success: untargeted or targeted, decided once per run.

:func:`uap.craft` builds one criterion — :class:`Untargeted` or :class:`Targeted` (``target=t``)
— and hands it to the method through the pass context (``ctx.criterion``). Everything that
differs between the two kinds of run asks it, so neither the driver nor an inner step tests
for a target (Foolbox's ``Misclassification`` / ``TargetedMisclassification`` play the same
part there):

- which images still need an update (:meth:`Criterion.needs_update`, from logits);
- the rate the stop rule reads and its record key (:meth:`Criterion.rate`, ``key``), and the
  extra entries of each pass record (:meth:`Criterion.record`);
- the loss an ascent method maximises (:meth:`Criterion.ascent_loss`, one of
  :data:`ASCENT_LOSSES`);
- whether Algorithm 1 accepts an update only when it raises the image's margin
  (``checks_updates``, :meth:`Criterion.improves`).

A targeted UAP sends most images to one chosen class ``t``. Its quality measure is the
**targeted success rate** ``mean_i 1[k̂(x_i + v) = t]``, to be read beside the class's base
rate ``mean_i 1[k̂(x_i) = t]``. The **target margin** ``m_t(x) = z_t(x) − max_{j≠t} z_j(x)`` is
positive exactly when ``t`` is the predicted class; targeted DeepFool linearises it, and
targeted Algorithm 1 accepts an update only if it raises it.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from uap.forward import DEFAULT_BATCH_SIZE
from uap.metrics import fooling_rate, predict

__all__ = [
    "Criterion",
    "Untargeted",
    "Targeted",
    "check_target",
    "target_margin",
    "targeted_success_rate",
    "clamped_cross_entropy",
    "ASCENT_LOSSES",
    "AscentLoss",
]

#: The losses an ascent method can maximise (:meth:`Criterion.ascent_loss`), untargeted / targeted
#: (``y``: the clean prediction k̂(x), ``t``: the target, ``z``: the logits at ``x + v``):
#:
#: - ``"ce"`` — the cross-entropy: ``min(CE(z, y), β)`` / ``−CE(z, t)`` (SGD-UAP, Shafahi et al.);
#: - ``"logit"`` — the logit of the class: ``−z_y`` / ``z_t`` (no softmax, so an image's gradient
#:   does not fade as it nears the boundary; SGA's and DF-UAP's alternative);
#: - ``"cw"`` — the C&W margin: ``min(max_{j≠y} z_j − z_y, β)`` / ``min(z_t − max_{j≠t} z_j, β)``,
#:   positive exactly when the image is fooled (sent to ``t``) and capped at ``β`` so that images
#:   pushed far across the boundary stop pulling ``v`` (DF-UAP, Zhang et al., CVPR 2020).
AscentLoss = Literal["ce", "logit", "cw"]
ASCENT_LOSSES: tuple[str, ...] = get_args(AscentLoss)


def check_target(target: object, num_classes: int) -> int:
    """``target`` as an int class index in ``[0, num_classes)``; ``ValueError`` otherwise."""
    if isinstance(target, bool) or not isinstance(target, (int, torch.Tensor)) or (
        isinstance(target, torch.Tensor) and (target.numel() != 1 or target.is_floating_point())
    ):
        raise ValueError(f"target must be a class index (an integer), got {target!r}")
    t = int(target)
    if not 0 <= t < num_classes:
        raise ValueError(f"target class {t} is out of range: the model has {num_classes} classes (0…{num_classes - 1})")
    return t


def target_margin(logits: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
    """``z_t − max_{j≠t} z_j`` per row: > 0 exactly when ``t`` is the predicted class.

    ``target`` is one class for all rows or an int tensor with one class per row.
    """
    t = torch.as_tensor(target, device=logits.device, dtype=torch.int64).expand(logits.shape[0]).reshape(-1, 1)
    zt = logits.gather(1, t)[:, 0]
    rivals = logits.scatter(1, t, float("-inf"))
    return zt - rivals.max(dim=1).values


@torch.no_grad()
def targeted_success_rate(
    model: nn.Module,
    x: torch.Tensor,
    v: torch.Tensor | None,
    target: int,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> float:
    """``mean_i 1[k̂(clip(x_i + v)) = target]``; with ``v=None`` the class's base rate on ``x``."""
    pred = predict(model, x, v, batch_size=batch_size)
    return (pred == int(target)).sum().item() / len(pred)


def clamped_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """``mean_i min(CE(logits_i, labels_i), β)`` — Shafahi et al.'s clamped loss ``ℓ̂``."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    return ce.clamp(max=beta).mean()


def _logit_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``z_{labels_i}`` per row."""
    return logits.gather(1, labels.reshape(-1, 1))[:, 0]


def _unknown_loss(loss: str) -> ValueError:
    return ValueError(f"unknown loss {loss!r}: use one of {', '.join(ASCENT_LOSSES)}")


class Criterion:
    """Success for one image and for the crafting set (see the module docstring)."""

    #: the pass-record entry the stop rule reads
    key: ClassVar[str] = "fooling_rate"
    #: the Foolbox criterion class (``foolbox.criteria.<name>``) of the same meaning
    foolbox: ClassVar[str] = "Misclassification"
    #: whether Algorithm 1 accepts an update only when :meth:`improves` says so
    checks_updates: ClassVar[bool] = False
    #: the class to reach, or None for an untargeted run
    target: int | None = None

    def reached(self, logits: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """Per row of ``logits`` (the images' logits at ``x + v``): whether the image already
        counts as fooled (``clean``: their clean predictions k̂(x_i))."""
        raise NotImplementedError

    def needs_update(self, logits: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """Per row: whether the image still needs an update (not :meth:`reached`)."""
        return ~self.reached(logits, clean)

    def labels(self, clean: torch.Tensor) -> torch.Tensor:
        """The class each image must leave (untargeted: ``clean``) or reach (targeted: ``t``)."""
        raise NotImplementedError

    def ascent_loss(self, logits: torch.Tensor, clean: torch.Tensor, beta: float, loss: str = "ce") -> torch.Tensor:
        """The scalar an ascent method maximises on a minibatch's ``logits``: the mean over the
        images of ``loss`` (one of :data:`ASCENT_LOSSES`; ``beta``: its clamp where it has one)."""
        raise NotImplementedError

    def improves(self, at_v: torch.Tensor, at_candidate: torch.Tensor) -> bool:
        """Whether one image's logits at the candidate ``v'`` are closer to success than at ``v``
        (read only when ``checks_updates``)."""
        return True

    def rate(self, model: nn.Module, x: torch.Tensor, v: torch.Tensor, *, clean: torch.Tensor,
             batch_size: int, fooling: float | None = None) -> float:
        """The rate the stop rule reads on ``x`` at ``v`` (``fooling``: the fooling rate there,
        when the caller already measured it)."""
        raise NotImplementedError

    def rate_of(self, pred: torch.Tensor, clean: torch.Tensor | None) -> float:
        """:meth:`rate` from the predictions ``pred`` at ``x + v`` (CPU labels; ``clean``: k̂(x),
        which a targeted criterion does not read), for a caller that has them already: the same number, without another forward pass."""
        raise NotImplementedError

    def record(self, model: nn.Module, heldout: torch.Tensor | None, v: torch.Tensor, rate: float, *,
               batch_size: int) -> dict[str, Any]:
        """Entries of a pass record beyond the driver's own (``rate``: :meth:`rate` at ``v``)."""
        return {}

    def record_of(self, rate: float | None, heldout_pred: torch.Tensor | None) -> dict[str, Any]:
        """:meth:`record` from the predictions on the held-out images at ``x + v`` (None: not
        measured, and then so are this criterion's held-out entries)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What the result's ``extra`` says about the criterion."""
        return {}


class Untargeted(Criterion):
    """Fool the model: an image counts once its prediction differs from the clean one,
    ``k̂(x_i + v) ≠ k̂(x_i)``; the stop rule reads the fooling rate Err(X_v)."""

    def reached(self, logits: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=1) != clean

    def labels(self, clean: torch.Tensor) -> torch.Tensor:
        return clean

    def ascent_loss(self, logits: torch.Tensor, clean: torch.Tensor, beta: float, loss: str = "ce") -> torch.Tensor:
        if loss == "ce":
            return clamped_cross_entropy(logits, clean, beta)
        if loss == "logit":
            return -_logit_of(logits, clean).mean()
        if loss == "cw":
            return (-target_margin(logits, clean)).clamp(max=beta).mean()
        raise _unknown_loss(loss)

    def rate(self, model: nn.Module, x: torch.Tensor, v: torch.Tensor, *, clean: torch.Tensor,
             batch_size: int, fooling: float | None = None) -> float:
        return fooling if fooling is not None else fooling_rate(model, x, v, clean=clean, batch_size=batch_size)

    def rate_of(self, pred: torch.Tensor, clean: torch.Tensor | None) -> float:
        if clean is None:
            raise ValueError("the fooling rate needs the clean predictions")
        return (pred != clean.cpu()).sum().item() / len(pred)  # as fooling_rate counts

    def __repr__(self) -> str:
        return "Untargeted()"


class Targeted(Criterion):
    """Send images to class ``target``: an image counts once its target margin is positive; the
    stop rule reads the targeted success rate, and each pass record also holds
    ``targeted_success_rate`` and ``heldout_targeted_success_rate``. Algorithm 1 accepts an
    update only if it raises the image's target margin (a projected step can undo it)."""

    key = "targeted_success_rate"
    foolbox = "TargetedMisclassification"
    checks_updates = True

    def __init__(self, target: int) -> None:
        if isinstance(target, bool) or not isinstance(target, int) or target < 0:
            raise ValueError(f"target must be a class index (an integer ≥ 0), got {target!r}")
        self.target = target

    def reached(self, logits: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return target_margin(logits, self.target) > 0

    def labels(self, clean: torch.Tensor) -> torch.Tensor:
        return torch.full_like(clean, self.target)

    def ascent_loss(self, logits: torch.Tensor, clean: torch.Tensor, beta: float, loss: str = "ce") -> torch.Tensor:
        if loss == "ce":
            return -F.cross_entropy(logits, self.labels(clean))  # unclamped: the loss to t falls to 0 by itself
        if loss == "logit":
            return _logit_of(logits, self.labels(clean)).mean()
        if loss == "cw":
            return target_margin(logits, self.target).clamp(max=beta).mean()
        raise _unknown_loss(loss)

    def improves(self, at_v: torch.Tensor, at_candidate: torch.Tensor) -> bool:
        return bool(target_margin(at_candidate, self.target)[0] > target_margin(at_v, self.target)[0])

    def rate(self, model: nn.Module, x: torch.Tensor, v: torch.Tensor, *, clean: torch.Tensor,
             batch_size: int, fooling: float | None = None) -> float:
        return targeted_success_rate(model, x, v, self.target, batch_size=batch_size)

    def record(self, model: nn.Module, heldout: torch.Tensor | None, v: torch.Tensor, rate: float, *,
               batch_size: int) -> dict[str, Any]:
        return {"targeted_success_rate": rate,
                "heldout_targeted_success_rate": None if heldout is None else targeted_success_rate(
                    model, heldout, v, self.target, batch_size=batch_size)}

    def rate_of(self, pred: torch.Tensor, clean: torch.Tensor | None) -> float:
        return (pred == int(self.target)).sum().item() / len(pred)  # as targeted_success_rate counts

    def record_of(self, rate: float | None, heldout_pred: torch.Tensor | None) -> dict[str, Any]:
        return {"targeted_success_rate": rate,
                "heldout_targeted_success_rate": None if heldout_pred is None else self.rate_of(heldout_pred, None)}

    def describe(self) -> dict[str, Any]:
        return {"target": self.target}

    def __repr__(self) -> str:
        return f"Targeted({self.target})"
