"""Self-supervised losses, one per paper, as pure functions (plus DINO's stateful centre).

- :func:`nt_xent` — SimCLR (Chen et al. 2020, eq. 1): each view's positive is the other view of
  the same image; the other ``2N − 2`` views in the batch are negatives.
- :func:`info_nce` — MoCo (He et al. 2020, eq. 1; v2: Chen et al. 2020): the positive is the
  momentum encoder's key of the same image; negatives come from a queue of past keys.
- :func:`byol_loss` — BYOL (Grill et al. 2020, eq. 2): ``2 − 2·cos(p, z)`` between the online
  prediction and the target projection; no negatives.
- :func:`dino_loss` / :class:`DINOLoss` — DINO (Caron et al. 2021, Alg. 1): cross-entropy between
  the sharpened, centred teacher distribution of each global view and the student distribution
  of every *other* view; the centre is an EMA of teacher outputs and the teacher temperature is
  warmed up linearly.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.precision import float32_loss
from models.schedules import linear_warmup
from uap.distributed import all_sum, gather_rows_with_grad

__all__ = ["nt_xent", "info_nce", "byol_loss", "dino_loss", "DINOLoss"]


@float32_loss
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Normalised-temperature cross-entropy over the ``2N`` views of a batch.

    ``z1[i]`` and ``z2[i]`` are projections of two views of image ``i``. Each of the ``2N``
    views is classified among the other ``2N − 1`` by cosine similarity / temperature, the
    correct class being its partner; the loss is the mean over all ``2N`` views.

    Under ``torch.distributed`` each rank passes its share of the global batch: the
    candidates are the views of the *global* batch (gathered with gradients flowing back to
    their rank, :func:`uap.distributed.gather_rows_with_grad`), and the loss is the mean over
    this rank's ``2n`` views; the ranks' losses weighted by their shares add up to the
    one-process loss of the global batch.

    Examples:
        >>> z = torch.randn(8, 16)
        >>> nt_xent(z, z + 0.01 * torch.randn(8, 16)).item() < nt_xent(z, torch.randn(8, 16)).item()
        True
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must be N×D of the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    (g1, mine), (g2, _) = gather_rows_with_grad(z1), gather_rows_with_grad(z2)
    n = len(g1)
    z = F.normalize(torch.cat([g1, g2]), dim=1)
    local = torch.arange(mine.start, mine.stop, device=z.device)
    anchors = torch.cat([local, local + n])  # this rank's views, as rows of the global 2N
    sim = z[anchors] @ z.T / temperature
    sim[torch.arange(len(anchors), device=z.device), anchors] = float("-inf")  # a view is never its own candidate
    return F.cross_entropy(sim, (anchors + n) % (2 * n))


@float32_loss
def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """InfoNCE with a queue of negatives: ``−log exp(q·k/τ) / (exp(q·k/τ) + Σ_n exp(q·n/τ))``.

    ``q`` (N×D, queries), ``k`` (N×D, positive keys, no gradient wanted) and ``queue`` (K×D,
    negative keys) are L2-normalised here.
    """
    if q.shape != k.shape or q.ndim != 2 or queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"need q, k of shape N×D and queue K×D; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(queue.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    q, k, queue = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(queue, dim=1)
    pos = (q * k).sum(1, keepdim=True)
    neg = q @ queue.T
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


@float32_loss
def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean normalised regression ``2 − 2·cos(p, z)`` (= ``‖p̂ − ẑ‖²``), in [0, 4]."""
    if p.shape != z.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and target {tuple(z.shape)} differ in shape")
    return (2 - 2 * F.cosine_similarity(p, z, dim=-1)).mean()


@float32_loss
def dino_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], center: torch.Tensor,
              student_temp: float = 0.1, teacher_temp: float = 0.04) -> torch.Tensor:
    """DINO cross-entropy over cross-view pairs.

    ``teacher`` holds the outputs of the global views (usually 2), ``student`` the outputs of
    all views with the global ones first, in the same order. Teacher targets are
    ``softmax((t − center) / teacher_temp)`` (centring + sharpening); the loss averages
    ``−Σ target · log_softmax(s / student_temp)`` over all pairs (teacher view i, student view
    j) with ``i ≠ j``.
    """
    if teacher_temp <= 0 or student_temp <= 0:
        raise ValueError("temperatures must be > 0")
    if len(student) < len(teacher):
        raise ValueError("the student must see at least the teacher's (global) views")
    targets = [F.softmax((t - center) / teacher_temp, dim=-1).detach() for t in teacher]
    log_probs = [F.log_softmax(s / student_temp, dim=-1) for s in student]
    total, pairs = 0.0, 0
    for i, t in enumerate(targets):
        for j, lp in enumerate(log_probs):
            if i == j:
                continue  # same view for teacher and student: skipped (cross-view pairs only)
            total = total + (-t * lp).sum(-1).mean()
            pairs += 1
    return total / pairs


class DINOLoss(nn.Module):
    """:func:`dino_loss` with DINO's state: the EMA centre of teacher outputs and the teacher
    temperature warm-up (``warmup_teacher_temp`` → ``teacher_temp`` over ``warmup_steps``)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, teacher_temp: float = 0.07,
                 warmup_teacher_temp: float = 0.04, warmup_steps: int = 0, center_momentum: float = 0.9):
        super().__init__()
        if not 0 < teacher_temp < student_temp:
            raise ValueError("DINO sharpens the teacher: need 0 < teacher_temp < student_temp")
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.warmup_teacher_temp, self.warmup_steps = warmup_teacher_temp, warmup_steps
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temperature(self, step: int) -> float:
        """Linear warm-up of the teacher temperature (DINO §4.2: 0.04 → 0.07)."""
        return linear_warmup(step, self.warmup_steps, self.warmup_teacher_temp, self.teacher_temp)

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], step: int) -> torch.Tensor:
        loss = dino_loss(student, teacher, self.center, self.student_temp, self.teacher_temperature(step))
        self.update_center(torch.cat(list(teacher)))
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """``center ← m·center + (1 − m)·mean(teacher outputs)``, the mean over the global batch
        when distributed (sums and counts all-reduced), so every rank holds the same centre."""
        batch_center = all_sum(teacher_out.sum(0, keepdim=True))
        count = all_sum(torch.tensor([float(len(teacher_out))], device=teacher_out.device))
        self.center.mul_(self.center_momentum).add_(batch_center / count, alpha=1 - self.center_momentum)
