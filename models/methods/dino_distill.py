"""Distilling a finished DINO model into a smaller backbone (Oquab et al., "DINOv2: Learning
Robust Visual Features without Supervision", TMLR 2024, §5 "Distillation of smaller models").

DINOv2 trains its small models not from scratch but against a large frozen teacher, with the
same self-supervised loss and multi-crop as the teacher's own training. Here the teacher is the
EMA teacher (backbone + DINO head) of a finished ``uap train dino`` run — what DINO ships — and
the student is the run's ``--backbone`` with a fresh DINO head of the teacher's ``out_dim``::

    views = multicrop(x)                              # 2 global + n_local local crops
    t = teacher_head(teacher_backbone(views[:2]))     # frozen: eval mode, no gradient, no EMA
    s = head(backbone(views))                         # the student sees every view
    loss = DINOLoss(s, t)                             # centred, sharpened teacher vs student

The forwards are DINO's (:func:`models.methods.dino.encode_views`: one packed pass per network when the
backbone has ``forward_packed``). The centre starts at the teacher run's final centre (the one
its outputs were centred with) and keeps DINO's EMA update. What this module leaves out of
DINOv2's recipe: the iBOT masked-token loss, the KoLeo regulariser, the spare EMA of the student
(the student itself ships), and switching off the student's stochastic depth.

The teacher is read from its run folder (``-H teacher=RUN``) with the loop's own config and
checkpoint loading every time the method is built; it is not part of this method's modules,
so it is neither trained, nor switched to train mode by the loop, nor written into the
student's checkpoints (a resumed run rebuilds it from ``teacher``; the folder must still be
there, also when the run's zoo entry is built). Its forwards on the two global views are extra
compute compared with training the student alone.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from models.augment import MultiCrop
from models.heads import DINOHead
from models.losses import DINOLoss
from models.methods.base import TrainingMethod, register_training_method
from models.methods.dino import DINO, encode_views
from models.train import CKPT_NAME, STATE_NAME, TrainConfig, build_method, load_checkpoint
from uap.options import Options

__all__ = ["DINODistill", "DINODistillOptions", "FrozenTeacher", "load_teacher"]


@dataclass
class FrozenTeacher:
    """A finished DINO run's EMA teacher: backbone and head (frozen, eval mode), the run's final
    centre of teacher outputs, and what a model card records about it."""

    backbone: nn.Module
    head: nn.Module
    center: torch.Tensor
    card: dict[str, Any]

    @property
    def out_dim(self) -> int:
        return self.center.shape[1]


def _teacher_run(teacher: object) -> tuple[Path, TrainConfig, dict]:
    """The run folder, config and state of a finished DINO run, or a one-line ``ValueError``."""
    if not isinstance(teacher, str) or not teacher:
        raise ValueError(f"dino-distill needs -H teacher=RUN_FOLDER (a finished `uap train dino` run), got {teacher!r}")
    run = Path(teacher).expanduser()
    if not run.is_dir():
        raise ValueError(f"teacher run folder {teacher} not found")
    if not (run / CKPT_NAME).is_file() or not (run / STATE_NAME).is_file():
        raise ValueError(f"teacher {teacher} holds no training run (expected {CKPT_NAME} and {STATE_NAME})")
    try:
        state = json.loads((run / STATE_NAME).read_text())
        config = TrainConfig(**state["config"])
        done = int(state["epoch"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"teacher {teacher}: {STATE_NAME} is not a training run's state ({e})") from None
    if config.method != "dino":
        raise ValueError(f"teacher {teacher} is a {config.method} run; dino-distill needs a `uap train dino` run")
    if done < config.epochs:
        raise ValueError(f"teacher {teacher} stopped at epoch {done}/{config.epochs}; finish it with --resume first")
    return run, config, state


@contextlib.contextmanager
def _generators_untouched() -> Iterator[None]:
    """Leave torch's generators as they were: building the teacher reseeds them, and the
    student's initialisation and augmentations must not depend on the teacher."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
        yield


def load_teacher(teacher: str) -> FrozenTeacher:
    """The frozen EMA teacher of the finished ``uap train dino`` run in folder ``teacher``:
    its method rebuilt from the run's config (:func:`models.train.build_method`) and its last
    checkpoint loaded (:func:`models.train.load_checkpoint`, weights only); torch's
    generators are left as they were. ``ValueError`` for a folder that is missing, holds no
    checkpoint, or holds a run of another method or an unfinished one."""
    run, config, _ = _teacher_run(teacher)
    with _generators_untouched():
        dino = build_method(config)
    state = load_checkpoint(run, dino, rng=False)
    backbone, head = dino.teacher_backbone, dino.teacher_head
    for module in (backbone, head):
        module.requires_grad_(False).eval()
    knn = [r["knn_acc"] for r in state.get("history", []) if "knn_acc" in r]
    card = {"run": teacher, "method": config.method, "backbone": config.backbone, "width": config.width,
            "parameters": sum(p.numel() for p in backbone.parameters()), "out_dim": dino.hparams["out_dim"],
            "epochs": config.epochs, "knn_monitor_acc": knn[-1] if knn else None,
            "weights": "the run's EMA teacher (teacher_backbone + teacher_head of its last checkpoint)",
            "train_command": state.get("command"), "config": asdict(config)}
    return FrozenTeacher(backbone, head, dino.criterion.center.detach().clone(), card)


@dataclass(frozen=True)
class DINODistillOptions(Options):
    """The hyper-parameters of :class:`DINODistill` (see there); ``teacher`` must name a finished
    ``uap train dino`` run, checked before anything is built."""

    teacher: str = ""
    n_local: int = 2
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_steps: int = 0
    center_momentum: float = 0.9
    packed: bool = True

    def check(self) -> None:
        _teacher_run(self.teacher)


@register_training_method()
class DINODistill(TrainingMethod):
    """A student backbone + DINO head trained to match a frozen DINO teacher on multi-crop views.

    Hyper-parameters (:class:`DINODistillOptions`):
        teacher: folder of a finished ``uap train dino`` run (its ``last.ckpt.safetensors`` and
            ``last.json``); required.
        n_local: local crops per image, besides the 2 global ones (the student sees all).
        student_temp, teacher_temp: softmax temperatures of :class:`models.losses.DINOLoss`.
        warmup_teacher_temp, warmup_teacher_steps: linear warm-up of the teacher temperature
            (none by default: the teacher is trained already).
        center_momentum: EMA momentum of the centre (which starts at the teacher run's centre).
        packed: one packed forward per network when the backbone has ``forward_packed``.
    """

    name = "dino-distill"
    Options = DINODistillOptions
    defaults = dict(DINO.defaults)

    def __init__(self, backbone: nn.Module, options: Mapping[str, Any] | Options | None = None, **hparams: Any):
        super().__init__(backbone, options, **hparams)
        o = self.options
        frozen = load_teacher(o.teacher)
        self.head = DINOHead(backbone.out_dim, frozen.out_dim)
        self.criterion = DINOLoss(frozen.out_dim, o.student_temp, o.teacher_temp, o.warmup_teacher_temp,
                                  o.warmup_teacher_steps, o.center_momentum)
        self.criterion.center.copy_(frozen.center)
        self.multicrop = MultiCrop(n_local=o.n_local)
        self.packed = o.packed
        # a tuple, not submodules: outside state_dict(), parameters() and train()
        self._teacher = (frozen.backbone, frozen.head)
        self._teacher_card = frozen.card

    @property
    def teacher_card(self) -> dict[str, Any]:
        """What the zoo card records about the teacher (:mod:`models.zoo_build`)."""
        return self._teacher_card

    @property
    def teacher_backbone(self) -> nn.Module:
        return self._teacher[0]

    @property
    def teacher_head(self) -> nn.Module:
        return self._teacher[1]

    def _frozen_teacher(self, x: torch.Tensor) -> tuple[nn.Module, nn.Module]:
        """The teacher on ``x``'s device and in its dtype (it is not moved with the method)."""
        backbone, head = self._teacher
        p = next(backbone.parameters())
        if p.device != x.device or p.dtype != x.dtype:
            backbone.to(x.device, x.dtype)
            head.to(x.device, x.dtype)
        return backbone, head

    def training_step(self, x: torch.Tensor, y: torch.Tensor, step: int, max_steps: int) -> torch.Tensor:
        views = self.multicrop(x)
        teacher_backbone, teacher_head = self._frozen_teacher(x)
        with torch.no_grad():
            teacher = encode_views(teacher_backbone, teacher_head, views[:2], self.packed)
        student = encode_views(self.backbone, self.head, views, self.packed)
        return self.criterion(student, teacher, step)
