"""``uap train``: train a target on CIFAR-10 with the one training loop (:func:`models.train.train`)."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from cli import command
from cli import options as o
from cli.console import console, literal

__all__ = ["train_cmd"]


@command("train")
def train_cmd(
    method: str = typer.Argument(..., help="supervised | airbench | simclr | moco | byol | dino | dino-distill "
                                 "(a smaller backbone against a finished dino run's frozen teacher: -H teacher=RUN) | clip | coca | simvlm "
                                 "(captioners) | uat "
                                 "(supervised against a universal δ: -H eps=0.0392 -H free=true …)"),
    epochs: int = typer.Option(30, help="Training epochs over CIFAR-10 train."),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per step (lr scales linearly from 256)."),
    backbone: str = typer.Option("resnet18", help="resnet18 (CIFAR stem), vit_small or vit_tiny (patch 4; vit_tiny "
                                 "has a quarter of vit_small's parameters), vig (Vision GNN: 4×4 patches as "
                                 "graph nodes) or airbench."),
    width: int = typer.Option(16, help="Channels of the first stage (resnet18, airbench)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate for batch 256 (default: the method's)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Default: the method's."),
    optimizer: Optional[str] = typer.Option(None, help="sgd | lars | adamw (default: the method's)."),
    warmup_epochs: Optional[float] = typer.Option(None, "--warmup-epochs", help="Linear lr warm-up."),
    seed: int = typer.Option(0, help="Seed for initialisation, data order and augmentations."),
    knn_every: int = typer.Option(5, "--knn-every", help="kNN monitor every N epochs (0: off)."),
    n_train: Optional[int] = typer.Option(None, "--n-train", help="Use a class-balanced subset of the training set "
                                          "(images a method holds out, e.g. clip's val_size, included)."),
    threads: int = o.threads_option(2),
    precision: str = typer.Option("fp32", help="fp32 | bf16 (bfloat16 autocast for the networks, float32 losses; "
                                                "faster on CPUs with native bfloat16)."),
    out: Path = typer.Option(Path("runs/train"), "--out", "-o", help="Run folder: per-epoch checkpoint + state JSON."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out (same settings; --epochs may "
                                "change during warm-up)."),
    zoo: Optional[str] = typer.Option(None, "--zoo", help="When done, measure and write models/zoo/NAME.{safetensors,json}."),
    hparam: List[str] = typer.Option([], "--hparam", "-H", help="Method hyper-parameter KEY=VALUE (repeatable), "
                                     "e.g. clip: embed_dim, text_width, text_layers, text_heads, word_dropout, val_size; "
                                     "dino-distill: teacher=RUN_FOLDER."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N (networks, data and augmentations)."),
    strategy: str = typer.Option("ddp", "--strategy", help="Under torchrun: ddp (gradients all-reduced) or fsdp "
                                 "(parameters, gradients and optimiser state sharded per block). --batch-size is the "
                                 "global batch, split over the ranks."),
) -> None:
    """Train a target model on CIFAR-10 (checkpoint every epoch; --resume continues).

    Example: uap train supervised --epochs 22 --batch-size 256 --width 16 --out runs/supervised --zoo supervised
    """
    from models.parallel import STRATEGIES
    from models.train import TrainConfig, train
    from uap import distributed
    from uap.atomic import check_output_folder

    hparams = o.key_values(hparam, "--hparam")
    command_line = "uap " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "--resume")
    torch_device = o.torch_device(device)
    o.use_threads(threads)
    check_output_folder(out, "--out")
    config = TrainConfig(method=method, backbone=backbone, width=width, epochs=epochs, batch_size=batch_size, lr=lr,
                         weight_decay=weight_decay, optimizer=optimizer, warmup_epochs=warmup_epochs, seed=seed,
                         knn_every=knn_every, n_train=n_train, threads=threads, precision=precision, hparams=hparams)
    if strategy not in STRATEGIES:
        raise o.UsageError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    train(config, out, resume=resume, console=console, command=command_line, device=torch_device, strategy=strategy)
    console.print(f"checkpoint: {literal(out)}")
    if zoo and distributed.is_main():
        from models.zoo import get_zoo_builder
        from models.zoo_build import build_zoo_entry

        with distributed.alone():  # rank 0 measures and writes the zoo entry by itself
            card = build_zoo_entry(out, zoo, console=console)
        console.print(f"zoo entry {literal(zoo)}: {literal(get_zoo_builder(card['builder']).summary(card))}")
