"""The one training loop for every registered training method (:mod:`models.methods`: supervised,
airbench, SimCLR, MoCo, BYOL, DINO, DINO distillation, CLIP):
per-step schedules, rich progress, kNN monitor, per-epoch atomic checkpoints and exact resume.

The loop keeps the whole training split in memory as a float tensor and draws each epoch's
order from a generator seeded by ``(seed, epoch)``, so a resumed run sees the same batches as
an uninterrupted one. Learning rate (and each method's own schedules) are pure functions of
the global step, and methods draw their randomness from torch's global generators, whose
state is saved; so weights, optimiser buffers, RNG states and the step counter are all a
resume needs. What differs between methods goes through the hooks of
:class:`models.methods.TrainingMethod` (parameter groups, held-out data, per-epoch metrics).

Resume rule, the same for every method: the configuration must match the checkpoint's, except
that ``epochs`` may change while the run is still in warm-up (the steps done so far are then
exactly those of a fresh run with the new length).

Data parallelism: under ``torch.distributed`` (``torchrun … uap train``) every rank draws the
same epoch order and trains on its :func:`uap.distributed.shard` of each global batch of
``batch_size`` images (⌊B/W⌋ or ⌈B/W⌉ rows when ``B`` does not divide by the ``W`` ranks; each
rank's loss is weighted by its share, so the gradient is the global batch's either way);
gradients are all-reduced by DDP or reduce-scattered by FSDP (:mod:`models.parallel`), the
learning rate is the global batch's, and rank 0 alone prints and writes the checkpoint
(which holds full tensors in the one-process layout). Each rank draws its augmentations from
its own generator stream (rank 0 continues the one-process stream, rank ``r`` is seeded from
``(seed, r)``); the checkpoint keeps every rank's generator state.

Resuming a distributed run: with the same number of ranks it is exact (every rank gets its
own generator state back). With a different number of ranks it also works when the global
batch is unchanged — the configuration (and so the data order, the batches, the learning
rate and the optimiser state) is the same, only the augmentations drawn from then on differ
from an uninterrupted run's, because each rank's generator stream depends on its rank and its
share of the batch; a stopped run resumes as the same run, but not bit for bit. MoCo's
``bn_splits`` must stay a multiple of the number of ranks.

Checkpoint layout (``out_dir``): ``last.ckpt.safetensors`` holds the method's state
(``model.*``), the optimiser's tensors (``optim.*``) and the RNG states (``rng.torch``, and
``rng.torch.ranks`` — one row per rank — for a distributed run), and in its header the state:
the config, step, epoch, wall time, history (loss, kNN and the method's metrics per epoch)
and, for a run stopped inside an epoch (``max_steps``), that epoch's losses so far;
``last.json`` is a readable copy of that state. Both are written with
:func:`uap.atomic.atomic_write`, so a crash never leaves a half-written file, and resuming
reads the state from the weights file, so a crash between the two writes cannot pair new
weights with the previous epoch's state.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.backbones import build_backbone
from models.global_batchnorm import global_batchnorm
from models.lars import LARS
from models.methods.base import TrainingMethod, get_training_method
from models.parallel import full_tensor, like_param, parallelize, rank_rows, rank_share, unsharded
from models.precision import autocast, check_precision
from models.probes import knn_accuracy
from uap.atomic import atomic_write
from uap.distributed import all_sum, gather_rows, is_main, world
from uap.forward import memory_format_for

__all__ = [
    "TrainConfig", "check_hparams", "build_method", "build_optimizer",
    "optimisation_step", "train", "sync_batchnorm_if_distributed",
    "save_checkpoint", "load_checkpoint", "CKPT_NAME", "STATE_NAME",
]

CKPT_NAME = "last.ckpt.safetensors"
STATE_NAME = "last.json"
_STATE_KEY = "state"  # the checkpoint's state, embedded in the weights file's header


def check_hparams(name: str, hparams: dict[str, Any]) -> None:
    """``ValueError`` unless method ``name`` is registered and ``hparams`` parse as its
    ``Options`` (known names, values of their types, the options' own checks), found without
    building anything."""
    get_training_method(name).parse_options(hparams)


@dataclass
class TrainConfig:
    """Everything that defines a run. ``None`` fields take the method's defaults
    (``TrainingMethod.defaults``); ``lr`` is for a batch of 256 and scales linearly with the batch.
    ``hparams`` are the hyper-parameters the run sets (the others keep their defaults), parsed
    by the method's ``Options`` (:mod:`models.methods.base`)."""

    method: str
    backbone: str = "resnet18"
    width: int = 16
    epochs: int = 30
    batch_size: int = 256
    lr: float | None = None
    weight_decay: float | None = None
    optimizer: str | None = None
    warmup_epochs: float | None = None
    seed: int = 0
    knn_every: int = 5
    n_train: int | None = None
    threads: int = 2
    precision: str = "fp32"
    hparams: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> "TrainConfig":
        """A copy with the method defaults filled in and every field validated."""
        cls = get_training_method(self.method)
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("epochs must be >= 1 and batch_size >= 2")
        cls.parse_options(self.hparams)
        d = cls.defaults
        out = TrainConfig(**{**asdict(self), "hparams": dict(self.hparams)})
        for key in ("lr", "weight_decay", "optimizer", "warmup_epochs"):
            if getattr(out, key) is None:
                setattr(out, key, d[key])
        check_precision(out.precision)
        for key in ("lr", "weight_decay", "warmup_epochs"):  # NaN would only show up as a NaN loss, later
            value = getattr(out, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                    or (key == "lr" and value == 0):
                raise ValueError(f"{key} must be a finite number {'> 0' if key == 'lr' else '≥ 0'}, got {value!r}")
        if out.optimizer not in ("sgd", "lars", "adamw"):
            raise ValueError(f"optimizer must be sgd, lars or adamw, got {out.optimizer!r}")
        return out


def build_method(config: TrainConfig) -> TrainingMethod:
    """Backbone + method from a (resolved) config; seeds the initialisation with ``config.seed``."""
    torch.manual_seed(config.seed)
    backbone = build_backbone(config.backbone, config.width)
    return get_training_method(config.method)(backbone, config.hparams)


def build_optimizer(method: TrainingMethod, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD (Nesterov, momentum 0.9), LARS or AdamW over the method's parameter groups
    (:meth:`TrainingMethod.param_groups`: which parameters get ``weight_decay``)."""
    groups = method.param_groups(weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optimizer must be sgd, lars or adamw, got {name!r}")


def sync_batchnorm_if_distributed(model: nn.Module) -> nn.Module:
    """Under ``torch.distributed``, convert BatchNorm to :class:`models.global_batchnorm.GlobalBatchNorm`
    so statistics are computed over the global batch (SimCLR §2.2 "Global BN": per-device BN
    lets the model cheat the contrastive task through leaked batch statistics), on CPU/gloo as
    on GPUs. No-op otherwise, and for methods with ``global_batchnorm = False`` (MoCo, which
    shuffles instead)."""
    if not getattr(model, "global_batchnorm", True):
        return model
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return global_batchnorm(model)
    return model


# --------------------------------------------------------------------------- checkpoints


def _rng_states() -> dict[str, torch.Tensor]:
    """This process's generator states: torch's CPU generator, and CUDA's when it is in use."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()  # GPU augmentations draw from here
    return states


def save_checkpoint(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Atomically write weights + optimiser tensors (safetensors) and ``state`` (JSON).

    Under ``torch.distributed`` every rank must call it (FSDP shards are gathered into full
    tensors, every rank's generator state is collected); rank 0 writes."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": full_tensor(v).detach().contiguous().clone() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, s in opt["state"].items():
        for k, v in s.items():
            v = full_tensor(v) if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"optim.{idx}.{k}"] = v.detach().contiguous().clone()
    ranks = world()[1]
    for name, rng in _rng_states().items():
        tensors[f"rng.{name}"] = rng
        if ranks > 1:  # one row per rank: each resumes its own stream
            tensors[f"rng.{name}.ranks"] = gather_rows(rng.view(1, -1), ranks)
    if not is_main():
        return
    meta = {**state, "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]],
            "world_size": ranks}
    text = json.dumps(meta, indent=2)
    # the state travels inside the weights file (one rename): a kill between the two renames
    # must not pair new weights with the previous epoch's state; last.json is a readable copy
    atomic_write(out_dir / CKPT_NAME, lambda p: save_file(tensors, str(p), metadata={_STATE_KEY: text}))
    atomic_write(out_dir / STATE_NAME, text)


def _require_checkpoint(out_dir: Path) -> tuple[Path, Path]:
    """The checkpoint's two files, or a FileNotFoundError that names them."""
    ckpt, meta_path = out_dir / CKPT_NAME, out_dir / STATE_NAME
    if not ckpt.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume in {out_dir} (expected {CKPT_NAME} and {STATE_NAME})")
    return ckpt, meta_path


def load_checkpoint(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    rng: bool = True) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns the JSON state, with
    ``"rng_restored"``: whether this process got its own generator state back (a rank other
    than 0 does not when the run was saved with another number of ranks). ``rng=False``
    loads the weights only and leaves this process's generators alone (reading a finished
    run's model inside another run, e.g. a distillation teacher).

    Full tensors are loaded into FSDP-sharded parameters and optimiser state as this rank's
    shards, so a checkpoint resumes under any strategy."""
    from safetensors.torch import load as load_tensors

    ckpt, meta_path = _require_checkpoint(out_dir)
    blob = ckpt.read_bytes()  # weights and their state from one read of one file
    tensors = load_tensors(blob)
    embedded = (json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")]).get("__metadata__") or {}).get(_STATE_KEY)
    meta = json.loads(embedded if embedded is not None else meta_path.read_text())  # older checkpoints: the sidecar
    current = model.state_dict()
    model.load_state_dict({k[6:]: like_param(v, current[k[6:]]) if k[6:] in current else v
                           for k, v in tensors.items() if k.startswith("model.")})
    if optimizer is not None:
        opt = optimizer.state_dict()
        params = [p for g in optimizer.param_groups for p in g["params"]]  # the state dict's indices
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, name = k.split(".", 2)
                param = params[int(idx)]
                state.setdefault(int(idx), {})[name] = like_param(v, param) if v.ndim and v.ndim == param.ndim else v
        groups = [{**saved, "params": g["params"]} for saved, g in zip(meta["param_groups"], opt["param_groups"])]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    if not rng:
        meta["rng_restored"] = False
        return meta
    rank, ranks = world()
    same_ranks = meta.get("world_size", 1) == ranks
    restored = rank == 0 or same_ranks
    for name, set_state in (("torch", torch.set_rng_state),
                            ("cuda", torch.cuda.set_rng_state if torch.cuda.is_available() else None)):
        if set_state is None:
            continue
        if ranks > 1 and same_ranks and f"rng.{name}.ranks" in tensors:
            set_state(tensors[f"rng.{name}.ranks"][rank].contiguous())
        elif rank == 0 and f"rng.{name}" in tensors:
            set_state(tensors[f"rng.{name}"])
    meta["rng_restored"] = restored
    return meta


# --------------------------------------------------------------------------- the loop


def _log(console, msg: str) -> None:
    if console is not None and is_main():
        console.print(msg, highlight=False)
        console.file.flush()  # keep a redirected log (nohup … > log) current


def optimisation_step(method: TrainingMethod, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                      step: int, total_steps: int, precision: str = "fp32", *, forward: nn.Module | None = None,
                      share: float = 1.0) -> torch.Tensor:
    """One step of any method: loss (under ``precision``'s autocast), backward, optimiser
    step, then the method's post-step updates (EMA teachers). Returns the loss.

    Distributed, ``x`` and ``y`` are this rank's rows of the global batch, ``share`` their
    fraction of it (:func:`models.parallel.rank_share`) and ``forward`` the wrapped step
    (:func:`models.parallel.parallelize`); the rank back-propagates ``share × ranks`` times
    its loss, which the strategy's gradient averaging turns into the gradient of the global
    batch's loss, and the returned loss is the global batch's (the same on every rank)."""
    with autocast(precision, x.device):
        loss = (forward or method.training_step)(x, y, step, total_steps)
    ranks = world()[1]
    total = all_sum(loss.detach() * share) if ranks > 1 else loss.detach()
    if not torch.isfinite(total):  # every rank sees the same total: all stop together
        raise FloatingPointError(f"loss became {total.item()} at step {step}; lower --lr")
    optimizer.zero_grad(set_to_none=True)
    (loss * (share * ranks) if ranks > 1 else loss).backward()
    optimizer.step()
    method.after_step(step, total_steps)
    return total


def _rank_seed(seed: int, rank: int, step: int) -> int:
    """The generator seed of rank ``rank`` > 0 starting (or re-starting) at ``step``."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % 2**63


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike,
    resume: bool = False,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
    monitor_data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    console=None,
    max_steps: int | None = None,
    command: str | None = None,
    device: str | torch.device = "cpu",
    strategy: str = "ddp",
) -> tuple[TrainingMethod, dict]:
    """Train ``config.method`` and return ``(method, state)``; checkpoints every epoch.

    ``data`` (images in [0, 1], labels) defaults to the CIFAR-10 training split (``n_train``
    images); the method may hold some of it out (:meth:`TrainingMethod.prepare_data`). ``monitor_data``
    (bank x, bank y, query x, query y) is used for the periodic kNN monitor (default: 5 000
    training and 2 000 test images). ``max_steps`` stops once the global step reaches it,
    also inside an epoch (the checkpoint then records where, and ``resume`` continues there).
    ``command`` (the command line that started the run) is recorded in the checkpoint state.
    ``device`` runs the networks, the data and the augmentations there (e.g. ``"cuda"``); it
    is not part of the configuration, so a run may resume on another device (augmentations
    drawn on a GPU then differ from a CPU run's). ``strategy`` (``ddp`` or ``fsdp``,
    :mod:`models.parallel`) is how gradients and parameters are shared under
    ``torch.distributed``; it is not part of the configuration either (checkpoints are full
    tensors), and without a process group it does nothing.
    With ``resume``, continues from ``out_dir``'s checkpoint under the resume rule above.
    """
    config = config.resolved()
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available on this machine")
    torch.set_num_threads(config.threads)
    out_dir = Path(out_dir)
    if resume:
        _require_checkpoint(out_dir)  # before the data is loaded: a wrong --out fails at once
    if data is None:
        from uap.data import load

        x, y, _ = load("cifar10", "train", n=config.n_train, seed=config.seed)
    else:
        x, y = data
    if monitor_data is None and config.knn_every > 0:
        from uap.data import load

        bx, by, _ = load("cifar10", "train", n=5000, seed=1)
        qx, qy, _ = load("cifar10", "test", n=2000, seed=1)
        monitor_data = (bx, by, qx, qy)

    x, y = x.to(device), y.to(device)
    if monitor_data is not None:
        monitor_data = tuple(t.to(device) for t in monitor_data)
    rank = world()[0]
    rows, share = rank_rows(config.batch_size), rank_share(config.batch_size)  # this rank's part of a batch
    method = sync_batchnorm_if_distributed(build_method(config)).to(device)
    if rank > 0:  # the other ranks draw their own augmentations
        torch.manual_seed(_rank_seed(config.seed, rank, 0))
    if config.backbone == "resnet18":  # channels-last where it is faster and safe (uap.forward.memory_format_for)
        method = method.to(memory_format=memory_format_for(method, device))
    x, y = method.prepare_data(x, y)
    if len(x) < config.batch_size:
        raise ValueError(f"batch_size {config.batch_size} is larger than the {len(x)} training images")
    lr = config.lr * config.batch_size / 256  # the global batch's
    stepper = parallelize(method, strategy)  # before the optimiser: FSDP replaces parameters by shards
    optimizer = build_optimizer(method, config.optimizer, lr, config.weight_decay)
    steps_per_epoch = len(x) // config.batch_size
    total_steps = config.epochs * steps_per_epoch
    warmup = min(int(config.warmup_epochs * steps_per_epoch), total_steps - 1)

    state: dict[str, Any] = {"config": asdict(config), "epoch": 0, "step": 0, "wall_s": 0.0, "history": [],
                             "images_per_s": None, "command": command}
    if resume:
        saved = load_checkpoint(out_dir, method, optimizer)
        if not saved["rng_restored"]:  # saved with another number of ranks: a fresh stream from here
            torch.manual_seed(_rank_seed(config.seed, rank, saved["step"]))
        saved["config"].setdefault("precision", "fp32")  # a checkpoint without the field ran in fp32
        diff = sorted(k for k in state["config"] if saved["config"].get(k) != state["config"][k])
        # Changing the length of a run is exact while it is still in warm-up: the warm-up
        # lr and the data order do not depend on the total, so the steps done so far are
        # those a fresh run with the new --epochs would have done.
        retimed = diff == ["epochs"] and saved["step"] <= warmup
        if diff and not retimed:
            raise ValueError(f"--resume with a different configuration ({', '.join(diff)}); "
                             f"use the original settings or a new output path")
        state.update({k: saved[k] for k in ("epoch", "step", "wall_s", "history", "images_per_s")})
        if "partial_epoch" in saved:
            state["partial_epoch"] = saved["partial_epoch"]
        state["command"] = command if retimed else (saved.get("command") or command)
        if retimed:
            _log(console, f"run length changed to {config.epochs} epochs during warm-up (step {saved['step']} "
                          f"<= {warmup}): identical to a fresh run with --epochs {config.epochs}")
        _log(console, f"resumed {config.method} at epoch {state['epoch']}/{config.epochs} (step {state['step']})")

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    live = console is not None and console.is_terminal and is_main()
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[ips]:.0f} img/s"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not live)
    method.train()
    with progress:
        task = progress.add_task(config.method, total=total_steps, completed=state["step"], loss=float("nan"), ips=0.0)
        for epoch in range(state["epoch"], config.epochs):
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
            partial = state.pop("partial_epoch", None) or {"losses": [], "wall_s": 0.0}
            losses, first = list(partial["losses"]), state["step"] - epoch * steps_per_epoch
            if first != len(losses) or first >= steps_per_epoch:
                raise ValueError(f"checkpoint in {out_dir} is inconsistent: step {state['step']} with "
                                 f"{state['epoch']} finished epochs of {steps_per_epoch} steps")
            t0 = time.perf_counter()
            for i in range(first, steps_per_epoch):
                step = state["step"]
                step_lr = method.learning_rate(step, total_steps, warmup, lr)
                for g in optimizer.param_groups:
                    g["lr"] = step_lr * g.get("lr_scale", 1.0)
                idx = order[i * config.batch_size:(i + 1) * config.batch_size][rows]
                loss = optimisation_step(method, optimizer, x[idx], y[idx], step, total_steps, config.precision,
                                         forward=stepper, share=share)
                state["step"] = step + 1
                losses.append(loss.item())
                ips = (i + 1 - first) * config.batch_size / (time.perf_counter() - t0)
                progress.update(task, advance=1, loss=losses[-1], ips=ips)
                if not live and console is not None and (i + 1) % 50 == 0:
                    _log(console, f"  epoch {epoch + 1} step {i + 1}/{steps_per_epoch} loss {losses[-1]:.4f} {ips:.0f} img/s")
                if max_steps is not None and state["step"] >= max_steps:
                    break
            dt = time.perf_counter() - t0
            state["wall_s"] += dt
            if len(losses) < steps_per_epoch:  # stopped by max_steps inside the epoch
                state["partial_epoch"] = {"losses": losses, "wall_s": partial["wall_s"] + dt}
                save_checkpoint(out_dir, method, optimizer, state)
                _log(console, f"stopped at step {state['step']} ({len(losses)}/{steps_per_epoch} of epoch "
                              f"{epoch + 1}); --resume continues from there")
                break
            record = {"epoch": epoch + 1, "loss": sum(losses) / len(losses),
                      "images_per_s": len(losses) * config.batch_size / (partial["wall_s"] + dt),
                      "lr": optimizer.param_groups[0]["lr"]}
            last = epoch + 1 == config.epochs
            with unsharded(stepper):  # every rank measures the same weights: the ranks stay in step
                metrics = method.on_epoch_end(epoch + 1)
                if monitor_data is not None and config.knn_every > 0 and ((epoch + 1) % config.knn_every == 0 or last):
                    metrics = {**metrics, "knn_acc": knn_accuracy(method.backbone, *monitor_data)}
            record.update(metrics)
            method.train()
            state["epoch"] = epoch + 1
            state["images_per_s"] = record["images_per_s"]
            state["history"].append(record)
            save_checkpoint(out_dir, method, optimizer, state)
            shown = "".join(f"  {k} {v:.4f}" for k, v in metrics.items() if k != "knn_acc")
            knn = f"  kNN {record['knn_acc']:.3f}" if "knn_acc" in record else ""
            _log(console, f"epoch {epoch + 1}/{config.epochs}  loss {record['loss']:.4f}  "
                          f"{record['images_per_s']:.0f} img/s  wall {state['wall_s'] / 60:.1f} min{shown}{knn}")
            if max_steps is not None and state["step"] >= max_steps:
                break
    method.eval()
    return method, state
