"""Turn a finished training run into a zoo entry: probe, measure, write weights + model card.

The card is produced by code, never by hand. For a run folder written by
:func:`models.train.train` this

1. rebuilds the method from the run's config and loads its last checkpoint;
2. extracts frozen features of the full CIFAR-10 train (50 000) and test (10 000) splits;
3. measures weighted kNN (k=200, T=0.1) and fits a linear probe (:mod:`models.probes`);
4. measures the *random-init* backbone (same seed, same architecture) the same way — the
   baseline an SSL method must beat;
5. ships ``encoder + head``: the supervised baseline's own trained head, or the linear probe
   for SSL methods, and records all numbers, the hyper-parameters, wall time, throughput and
   the exact ``uap train`` command in the card (with the weights' sha256).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.probes import ProbedClassifier, accuracy, extract_features, knn_predict, train_linear_probe
from models.train import STATE_NAME, TrainConfig, build_method, load_checkpoint
from models.zoo import save_entry

__all__ = ["build_zoo_entry", "probe_encoder"]

NUM_CLASSES = 10


def probe_encoder(encoder: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                  test_y: torch.Tensor, k: int = 200, temperature: float = 0.1,
                  probe_epochs: int = 100, seed: int = 0) -> tuple[nn.Linear, dict[str, float]]:
    """kNN and linear-probe accuracy of a frozen encoder; returns ``(probe, metrics)``."""
    f_train, f_test = extract_features(encoder, train_x), extract_features(encoder, test_x)
    knn = accuracy(knn_predict(f_test, f_train, train_y, NUM_CLASSES, k, temperature), test_y)
    probe = train_linear_probe(f_train, train_y, NUM_CLASSES, epochs=probe_epochs, seed=seed)
    with torch.no_grad():
        lin = accuracy(probe(f_test), test_y)
        lin_train = accuracy(probe(f_train), train_y)
    return probe, {"knn_acc": knn, "linear_probe_acc": lin, "linear_probe_train_acc": lin_train}


def build_zoo_entry(run_dir: str | os.PathLike, name: str, console=None, zoo_dir: str | os.PathLike | None = None,
                    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                    probe_epochs: int = 100) -> dict[str, Any]:
    """Probe the run in ``run_dir`` and write ``NAME.safetensors`` + ``NAME.json`` to the zoo.

    ``data`` = (train x, train y, test x, test y) defaults to the full CIFAR-10 splits.
    Returns the model card.
    """
    run_dir = Path(run_dir)
    state_path = run_dir / STATE_NAME
    if not state_path.is_file():
        raise FileNotFoundError(f"{state_path} not found: train first with `uap train METHOD --out {run_dir}`")
    state = json.loads(state_path.read_text())
    config = TrainConfig(**state["config"])
    if state["epoch"] < config.epochs:
        raise ValueError(f"run {run_dir} stopped at epoch {state['epoch']}/{config.epochs}; finish it with --resume first")

    def say(msg: str) -> None:
        if console is not None:
            console.print(msg, highlight=False)
            console.file.flush()

    if data is None:
        from uap.data import load

        train_x, train_y, _ = load("cifar10", "train")
        test_x, test_y, _ = load("cifar10", "test")
        data_desc = {"dataset": "cifar10", "train_images": len(train_x), "test_images": len(test_x),
                     "source": "uap.data.load('cifar10') — CIFAR-10 JPEG ImageFolder under $UAP_DATA_DIR"}
    else:
        train_x, train_y, test_x, test_y = data
        data_desc = {"dataset": "custom", "train_images": len(train_x), "test_images": len(test_x)}
    torch.set_num_threads(config.threads)

    method = build_method(config)
    load_checkpoint(run_dir, method)
    method.eval()
    encoder = method.backbone
    say(f"probing {config.method} encoder on {len(train_x)} train / {len(test_x)} test images …")
    probe, metrics = probe_encoder(encoder, train_x, train_y, test_x, test_y, probe_epochs=probe_epochs, seed=config.seed)

    say("probing the random-init backbone (same seed and architecture) …")
    random_method = build_method(config).eval()
    _, rand = probe_encoder(random_method.backbone, train_x, train_y, test_x, test_y,
                            probe_epochs=probe_epochs, seed=config.seed)

    if config.method == "supervised":
        head, head_kind = method.head, "supervised cross-entropy head (trained with the backbone)"
    else:
        head, head_kind = probe, "linear probe on frozen features (standardisation folded in)"
    classifier = ProbedClassifier(encoder, nn.Linear(encoder.out_dim, NUM_CLASSES))
    classifier.head.load_state_dict(head.state_dict())
    classifier.eval()
    with torch.no_grad():
        shipped_acc = accuracy(torch.cat([classifier(test_x[i:i + 1000]) for i in range(0, len(test_x), 1000)]), test_y)

    card: dict[str, Any] = {
        "builder": "probed",
        "method": config.method,
        "backbone": config.backbone if config.backbone != "resnet18" else f"resnet18 (width {config.width})",
        "architecture": {"backbone": config.backbone, "width": config.width, "num_classes": NUM_CLASSES,
                         "feature_dim": encoder.out_dim,
                         "parameters": sum(p.numel() for p in encoder.parameters())},
        "input": "images in [0, 1], N×3×32×32; CIFAR-10 normalisation is inside the model",
        "classifier_head": head_kind,
        "accuracy": shipped_acc,
        "linear_probe_acc": metrics["linear_probe_acc"] if config.method != "supervised" else shipped_acc,
        "linear_probe_on_frozen_features_acc": metrics["linear_probe_acc"],
        "linear_probe_train_acc": metrics["linear_probe_train_acc"],
        "knn_acc": metrics["knn_acc"],
        "knn": {"k": 200, "temperature": 0.1, "bank": "full training split, L2-normalised features"},
        "random_init_linear_probe_acc": rand["linear_probe_acc"],
        "random_init_knn_acc": rand["knn_acc"],
        "linear_probe": {"optimizer": "AdamW", "epochs": probe_epochs, "lr": 1e-2, "weight_decay": 1e-4,
                         "batch_size": 1024, "augmentation": "none (frozen features of un-augmented images)"},
        "epochs": config.epochs,
        "hyperparameters": {**asdict(config), "method_hparams": method.hparams,
                            "lr_effective": config.lr * config.batch_size / 256},
        "wall_time_s": round(state["wall_s"], 1),
        "train_images_per_s": state.get("images_per_s"),
        "history": state["history"],
        "data": data_desc,
        "train_command": state.get("command") or _reconstruct_command(config, run_dir, name),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "software": {"torch": torch.__version__, "python": platform.python_version()},
        "machine": f"{platform.machine()} CPU, {config.threads} torch threads (shared)",
    }
    card = save_entry(name, classifier, card, zoo_dir=zoo_dir)
    say(f"wrote zoo entry {name}: accuracy {shipped_acc:.4f}, linear probe {card['linear_probe_acc']:.4f}, "
        f"kNN {metrics['knn_acc']:.4f}; random init: linear {rand['linear_probe_acc']:.4f}, kNN {rand['knn_acc']:.4f}")
    return card


def _reconstruct_command(config: TrainConfig, run_dir: Path, name: str) -> str:
    parts = [f"uap train {config.method}", f"--epochs {config.epochs}", f"--batch-size {config.batch_size}",
             f"--backbone {config.backbone}", f"--width {config.width}", f"--seed {config.seed}",
             f"--lr {config.lr}", f"--weight-decay {config.weight_decay}", f"--optimizer {config.optimizer}",
             f"--warmup-epochs {config.warmup_epochs}", f"--out {run_dir}", f"--zoo {name}"]
    parts += [f"-H {k}={json.dumps(v)}" for k, v in config.hparams.items()]
    return " ".join(parts)
