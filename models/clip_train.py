"""Training CLIP on CIFAR-10 with generated captions: ``train_clip`` (``uap train clip``).

A short script in the spirit of the paper's pseudo-code: each step draws a batch of training
images, writes a fresh caption for every image (a random training template filled with the
image's class and measured colour/brightness words, :mod:`models.captions`), augments the
images with the CIFAR crop-and-flip (no colour jitter: it would make the colour words false),
and minimises the symmetric contrastive loss with AdamW and a warm-up + cosine learning rate.
After each step 1/τ is clipped at 100 as in CLIP.

Word dropout (a few caption words → ``<unk>``, never the class name) trains the ``<unk>``
embedding, which is what unseen words of held-out zero-shot prompts become.

1 000 class-balanced training images (``val_size``) are held out as a validation set; their zero-shot
accuracy (held-out templates) is logged each epoch. No model selection is made: the final
epoch's weights are the result, evaluated once on the full test set for the model card.

Every epoch writes ``OUTPUT/last.safetensors`` + ``last.json`` atomically (weights, AdamW
state, RNG states, history); ``resume=True`` continues from it exactly. The finished model is
``OUTPUT/clip.safetensors`` + ``clip.json`` (the zoo entry, ``"builder": "clip"``).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from models.augment import random_crop_flip
from models.captions import (HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, all_training_captions, image_attributes,
                             make_captions)
from models.clip import CLIP, CLIPConfig, clip_card, zero_shot_classifier
from models.clip_eval import caption_set, retrieval_recall_at_1, zero_shot_accuracy
from models.precision import autocast, check_precision
from models.schedules import warmup_cosine_schedule
from models.tokenizer import WordTokenizer, mask_words, split_words

__all__ = ["train_clip", "clip_param_groups", "clip_training_step", "evaluate_clip"]

def clip_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices/kernels only; none on biases, norms,
    embeddings and the logit scale (as in CLIP's training code)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "embedding" in name or name.endswith("log_logit_scale")
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def clip_training_step(clip: CLIP, x: torch.Tensor, captions: list[str], class_token_ids: torch.Tensor,
                       word_dropout: float, generator: torch.Generator) -> torch.Tensor:
    """Loss on one batch: crop/flip images, tokenize captions, word-dropout (class words kept)."""
    ids, eot = clip.tokenizer.encode(captions)
    ids = mask_words(ids, eot, word_dropout, keep=torch.isin(ids, class_token_ids), generator=generator)
    views = random_crop_flip(x, generator=generator)
    dev = clip.log_logit_scale.device
    return clip.loss(views.to(dev), ids.to(dev), eot.to(dev))


@torch.no_grad()
def evaluate_clip(clip: CLIP, x: torch.Tensor, y: torch.Tensor, classes, templates=HELD_OUT_TEMPLATES,
                  retrieval_images: int = 1000, seed: int = 0) -> dict:
    """Model-card metrics: zero-shot accuracy on ``(x, y)`` with ``templates`` and retrieval
    recall@1 on the first ``retrieval_images`` of a seeded permutation with their captions."""
    acc = zero_shot_accuracy(zero_shot_classifier(clip, classes, templates), x, y)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:retrieval_images]
    recall = retrieval_recall_at_1(clip, x[idx], caption_set(x[idx], y[idx], classes, seed))
    return {"zero_shot_accuracy": acc, "retrieval_images": len(idx),
            "retrieval_captions": f"one caption per image from the training templates (seed {seed}); a hit is a "
                                  "retrieved item whose caption text equals the query pair's",
            "image_to_text_recall@1": recall["image_to_text"], "text_to_image_recall@1": recall["text_to_image"]}


# --------------------------------------------------------------------------- checkpoint state

def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {f"optim.{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items()
               if isinstance(v, torch.Tensor)}
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _save_last(out: Path, clip: CLIP, opt, gen: torch.Generator, meta: dict) -> None:
    """``last.safetensors`` (weights, AdamW moments, RNG states) then ``last.json`` (epoch,
    history, optimiser hyper-parameters), each written to a temp file and renamed."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v for k, v in clip.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = gen.get_state()
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    meta = {**meta, "optimizer": opt_meta, "config": asdict(clip.config), "tokenizer": clip.tokenizer.to_json()}
    _atomic_write(out / "last.safetensors", lambda t: save_file(tensors, str(t)))
    _atomic_write(out / "last.json", lambda t: t.write_text(json.dumps(meta, indent=2) + "\n"))


# --------------------------------------------------------------------------- the loop

def train_clip(
    output: str | os.PathLike = "runs/clip",
    *,
    epochs: int = 30,
    batch_size: int = 256,
    backbone: str = "resnet18",
    width: int = 16,
    embed_dim: int = 128,
    text_width: int = 64,
    text_layers: int = 3,
    text_heads: int = 4,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    warmup_epochs: float = 1.0,
    word_dropout: float = 0.05,
    seed: int = 0,
    resume: bool = False,
    stop_after_epochs: int | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    val_size: int = 1000,
    dataset: str = "cifar10",
    threads: int | None = None,
    precision: str = "fp32",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    command: str | None = None,
) -> Path:
    """Train CLIP on CIFAR-10 captions and write ``OUTPUT/clip.{safetensors,json}``.

    Args:
        output: run folder (checkpoints ``last.*`` each epoch, final ``clip.*``).
        epochs, batch_size: schedule; the learning rate ``lr`` is for ``batch_size`` as given.
        backbone, width: image encoder from :mod:`models.backbones`.
        embed_dim, text_width, text_layers, text_heads: joint space and text transformer.
        lr, weight_decay, warmup_epochs: AdamW with linear warm-up and cosine decay to 0.
        word_dropout: probability of replacing a non-class caption word by ``<unk>``.
        seed: seeds initialisation, data order, captions and augmentations.
        resume: continue from ``OUTPUT/last.*`` if present (same arguments expected, except
            ``epochs``, which may be raised to extend a run).
        stop_after_epochs: return after this many epochs *in this call* (a time-boxed slice
            of the run; continue later with ``resume=True``).
        n_train: train on a class-balanced subset (``None`` = all 49 000 after validation).
        n_test: evaluate the card's metrics on a subset of the test set (``None`` = all 10 000).
        val_size: class-balanced training images held out for the per-epoch zero-shot log.
        threads: ``torch.set_num_threads`` for the run (``None`` leaves it).
        precision: ``"fp32"`` or ``"bf16"`` (bfloat16 autocast for the encoders, float32 loss;
            :mod:`models.precision`).
        progress: show a rich progress bar; ``log`` receives one line per epoch.
        command: the command line recorded in the card (default: rebuilt from the arguments).
    Returns:
        Path of the final weights ``OUTPUT/clip.safetensors`` (``OUTPUT/last.safetensors`` when
        stopped early by ``stop_after_epochs``).
    """
    from uap.data import balanced_subset, load_split

    if epochs < 1 or batch_size < 2:
        raise ValueError(f"need epochs >= 1 and batch_size >= 2, got {epochs} and {batch_size}")
    if threads:
        torch.set_num_threads(threads)
    check_precision(precision)  # before any data is loaded
    log = log or (lambda line: print(line, file=sys.stderr))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    train = load_split(dataset, "train")
    labels = train.y.numpy()
    if not 0 < val_size < len(labels):
        raise ValueError(f"val_size must be in [1, {len(labels) - 1}], got {val_size}")
    val_idx = balanced_subset(labels, val_size, seed)
    rest = np.setdiff1d(np.arange(len(labels)), val_idx)
    if n_train is not None:
        rest = rest[balanced_subset(labels[rest], n_train, seed)]
    x, y, classes = train.x[rest], train.y[rest], train.classes
    x_val, y_val = train.x[val_idx], train.y[val_idx]
    if len(x) < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(x)} training images")
    attributes = image_attributes(x)

    tokenizer = WordTokenizer.build(all_training_captions(classes), context_length=16)
    config = CLIPConfig(backbone=backbone, width=width, embed_dim=embed_dim, context_length=tokenizer.context_length,
                        text_width=text_width, text_layers=text_layers, text_heads=text_heads)
    clip = CLIP(config, tokenizer)
    opt = torch.optim.AdamW(clip_param_groups(clip, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    class_token_ids = torch.tensor(sorted({tokenizer.stoi[w] for c in classes for w in split_words(c)}))
    steps_per_epoch = len(x) // batch_size  # drop the last partial batch: the loss needs full batches
    max_steps, warmup = epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch)
    warmup = min(warmup, max_steps - 1)
    args = {"epochs": epochs, "batch_size": batch_size, "backbone": backbone, "width": width, "lr": lr,
            "embed_dim": embed_dim, "text_width": text_width, "text_layers": text_layers, "text_heads": text_heads,
            "weight_decay": weight_decay, "warmup_epochs": warmup_epochs, "word_dropout": word_dropout,
            "seed": seed, "n_train": n_train, "val_size": val_size, "dataset": dataset,
            "precision": precision}
    history, start_epoch, elapsed = [], 0, 0.0

    last = out / "last.safetensors"
    if resume and last.is_file():
        from safetensors.torch import load_file

        meta = json.loads((out / "last.json").read_text())
        same = {k: v for k, v in args.items() if k != "epochs"}
        saved_args = {"precision": "fp32", **meta.get("args", {})}  # runs from before the option existed
        if {k: v for k, v in saved_args.items() if k != "epochs"} != same:
            raise ValueError(f"cannot resume {last}: it was trained with {meta.get('args')}, now {args}")
        tensors = load_file(str(last))
        clip.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        _load_optimizer(opt, tensors, meta["optimizer"])
        torch.set_rng_state(tensors["rng.torch"])
        gen.set_state(tensors["rng.data"])
        history, start_epoch, elapsed = meta["history"], meta["epoch"], meta["train_seconds"]
        log(f"resumed from {last} after epoch {start_epoch}")

    end_epoch = epochs if stop_after_epochs is None else min(epochs, start_epoch + stop_after_epochs)
    bar = _progress(progress)
    with bar:
        task = bar.add_task("clip", total=max_steps, completed=start_epoch * steps_per_epoch, loss=float("nan"))
        for epoch in range(start_epoch, end_epoch):
            t0 = time.perf_counter()
            clip.train()
            order = torch.randperm(len(x), generator=gen)
            losses = []
            for b in range(steps_per_epoch):
                step = epoch * steps_per_epoch + b
                for group in opt.param_groups:
                    group["lr"] = warmup_cosine_schedule(step, max_steps, warmup, lr)
                idx = order[b * batch_size:(b + 1) * batch_size]
                captions = make_captions(attributes[idx], y[idx], classes, TRAIN_TEMPLATES, gen)
                with autocast(precision):
                    loss = clip_training_step(clip, x[idx], captions, class_token_ids, word_dropout, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                clip.clamp_logit_scale_()
                losses.append(loss.item())
                bar.update(task, advance=1, loss=losses[-1])
            elapsed += time.perf_counter() - t0
            val_acc = zero_shot_accuracy(zero_shot_classifier(clip, classes), x_val, y_val)
            history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_zero_shot_accuracy": val_acc,
                            "logit_scale": float(clip.logit_scale.detach()), "seconds": elapsed})
            log(f"epoch {epoch + 1}/{epochs}  loss {history[-1]['loss']:.4f}  val zero-shot {val_acc:.3f}  "
                f"1/τ {history[-1]['logit_scale']:.1f}  {elapsed:.0f}s")
            _save_last(out, clip, opt, gen, {"args": args, "epoch": epoch + 1, "history": history,
                                             "train_seconds": elapsed})
    if end_epoch < epochs:
        log(f"stopped after epoch {end_epoch}/{epochs}; continue with resume=True (--resume)")
        return out / "last.safetensors"

    from models.zoo import save_entry

    x_test, y_test, _ = _load_test(dataset, n_test, seed)
    metrics = evaluate_clip(clip, x_test, y_test, classes, HELD_OUT_TEMPLATES, seed=seed)
    classifier = zero_shot_classifier(clip.eval(), classes, HELD_OUT_TEMPLATES)
    card = {
        **clip_card(classifier),
        "method": "clip",
        "description": "CLIP (Radford et al. 2021) trained on CIFAR-10 with generated captions; "
                       "logits are zero-shot (prompt ensemble of held-out templates)",
        "backbone": f"{backbone} (width {width})" if backbone == "resnet18" else backbone,
        "epochs": epochs,
        "zero_shot_acc": metrics["zero_shot_accuracy"],
        "train_templates": list(TRAIN_TEMPLATES),
        "metrics": {**metrics, "test_images": len(x_test), "split": "test",
                    "note": "zero-shot uses held-out templates never seen in training"},
        "training": {**args, "train_images": len(x), "train_seconds": round(elapsed, 1), "threads": torch.get_num_threads(),
                     "command": command or _command(args, out), "history": history},
    }
    log(f"test zero-shot accuracy {metrics['zero_shot_accuracy']:.4f} on {len(x_test)} images; "
        f"retrieval R@1 i→t {metrics['image_to_text_recall@1']:.3f} t→i {metrics['text_to_image_recall@1']:.3f}")
    save_entry("clip", classifier, card, zoo_dir=out)
    return out / "clip.safetensors"


def _load_test(dataset: str, n: int | None, seed: int):
    from uap.data import load

    return load(dataset, "test", n=n, seed=seed)


_CLI_FLAGS = {"epochs": "--epochs", "batch_size": "--batch-size", "backbone": "--backbone", "width": "--width",
              "lr": "--lr", "weight_decay": "--weight-decay", "warmup_epochs": "--warmup-epochs", "seed": "--seed"}


def _command(args: dict, out: Path) -> str:
    """The ``uap train clip`` line that reproduces ``args`` (text-tower settings as ``-H``)."""
    parts = ["uap train clip"] + [f"{flag} {args[k]}" for k, flag in _CLI_FLAGS.items()]
    if args["n_train"] is not None:
        parts.append(f"--n-train {args['n_train']}")
    parts += [f"-H {k}={args[k]}" for k in ("embed_dim", "text_width", "text_layers", "text_heads", "word_dropout",
                                             "val_size")]
    return " ".join(parts + [f"--out {out}"])


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(), disable=not enabled)
