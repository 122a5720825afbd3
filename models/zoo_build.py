"""Turn a finished training run into a zoo entry: measure, write weights + model card; the built-in builders.

The card is produced by code, never by hand. For a run folder written by
:func:`models.train.train` this rebuilds the method from the run's config, loads its last
checkpoint and ships the classifier of the zoo builder the method names
(:attr:`~models.methods.TrainingMethod.zoo_builder`, a :class:`models.zoo.ZooBuilder`
registered by name). The two built-in builders:

- ``"probed"`` (supervised, SimCLR, MoCo, BYOL, DINO, DINO distillation): frozen features of
  the full CIFAR-10 train and test splits give a weighted kNN (k=200, T=0.1) and a linear probe
  (:mod:`models.probes`); the *random-init* backbone (same seed, same architecture) is
  measured the same way — the baseline an SSL method must beat. The entry is ``encoder +
  head``: the head a supervised method trained (:meth:`~models.methods.TrainingMethod.classifier_head`),
  or the linear probe. A method with ``report_tta`` (airbench) also gets its accuracy under
  mirror / mirror + translate test-time augmentation (:mod:`models.tta`) on the card; the entry
  itself ships without it. A distilled student (``dino-distill``) ships its own backbone; its
  card records the teacher (run folder, architecture, and the teacher run's zoo entry with its
  accuracies when the zoo holds one).
- ``"clip"``: the zero-shot classifier (prompt ensemble of the held-out templates,
  :func:`models.clip.zero_shot_classifier`), with zero-shot accuracy and retrieval recall@1
  on the test split (:func:`models.clip_eval.evaluate_clip`).

Either card also records the hyper-parameters, wall time, throughput, the history and the
exact ``uap train`` command (and :func:`models.zoo.save_entry` adds the weights' sha256).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from models.methods.base import TrainingMethod
from models.probes import ProbedClassifier, accuracy, extract_features, knn_predict, train_linear_probe
from models.train import STATE_NAME, TrainConfig, build_method, load_checkpoint
from models.tta import FlipTranslateTTA
from models.zoo import Data, ZooBuilder, get_zoo_builder, register_zoo_builder, save_entry

__all__ = ["build_zoo_entry", "probe_encoder", "ProbedBuilder", "ZeroShotBuilder"]

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
                    data: Data | None = None, probe_epochs: int = 100) -> dict[str, Any]:
    """Measure the run in ``run_dir`` and write ``NAME.safetensors`` + ``NAME.json`` to the zoo.

    ``data`` = (train x, train y, test x, test y) defaults to the full CIFAR-10 splits (a CLIP
    entry only reads the test split). ``probe_epochs`` is for probed entries. Returns the card
    (its headline result: ``models.zoo.get_zoo_builder(card["builder"]).summary(card)``).
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

    torch.set_num_threads(config.threads)
    method = build_method(config)
    load_checkpoint(run_dir, method)
    method.eval()
    classifier, card = get_zoo_builder(method.zoo_builder).build(method, config, data, say, probe_epochs)
    if "teacher" in card:
        card["teacher"]["zoo_entry"] = _teacher_zoo_entry(card["teacher"], zoo_dir)
    card.update({
        "epochs": config.epochs,
        "hyperparameters": {**asdict(config), "method_hparams": method.hparams,
                            "lr_effective": config.lr * config.batch_size / 256},
        "wall_time_s": round(state["wall_s"], 1),
        "train_images_per_s": state.get("images_per_s"),
        "history": state["history"],
        "train_command": state.get("command") or _reconstruct_command(config, run_dir, name),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "software": {"torch": torch.__version__, "python": platform.python_version()},
        "machine": f"{platform.machine()} CPU, {config.threads} torch threads (shared)",
    })
    return save_entry(name, classifier, card, zoo_dir=zoo_dir)


def _backbone_name(config: TrainConfig) -> str:
    return f"{config.backbone} (width {config.width})" if config.backbone in ("resnet18", "airbench") else config.backbone


def _cifar10(splits: tuple[str, ...]) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The full CIFAR-10 ``splits`` as ``[x, y, …]`` and the card's description of them."""
    from uap.data import load

    tensors, desc = [], {"dataset": "cifar10"}
    for split in splits:
        x, y, _ = load("cifar10", split)
        tensors += [x, y]
        desc[f"{split}_images"] = len(x)
    desc["source"] = "uap.data.load('cifar10') — CIFAR-10 JPEG ImageFolder under $UAP_DATA_DIR"
    return tensors, desc


def _custom(data: Data, splits: tuple[str, ...]) -> tuple[list[torch.Tensor], dict[str, Any]]:
    tensors = {"train": list(data[:2]), "test": list(data[2:])}
    return ([t for s in splits for t in tensors[s]],
            {"dataset": "custom", **{f"{s}_images": len(tensors[s][0]) for s in splits}})


@register_zoo_builder("probed")
class ProbedBuilder(ZooBuilder):
    """Encoder + linear head: the supervised methods' own head or a linear probe on frozen features."""

    def rebuild(self, card: dict[str, Any]) -> nn.Module:
        """The backbone of ``card["architecture"]`` with a linear head of its ``num_classes``."""
        from models.backbones import build_backbone

        arch = card["architecture"]
        encoder = build_backbone(arch["backbone"], arch.get("width", 16))
        return ProbedClassifier(encoder, nn.Linear(encoder.out_dim, arch["num_classes"]))

    def summary(self, card: dict[str, Any]) -> str:
        return f"linear probe {card['linear_probe_acc']:.4f}, kNN {card['knn_acc']:.4f}"

    def build(self, method: TrainingMethod, config: TrainConfig, data: Data | None, say: Callable[[str], None],
              probe_epochs: int) -> tuple[nn.Module, dict[str, Any]]:
        """Encoder + linear head, with kNN / linear-probe accuracies and the random-init baseline."""
        (train_x, train_y, test_x, test_y), data_desc = (_custom(data, ("train", "test")) if data is not None
                                                         else _cifar10(("train", "test")))
        encoder = method.backbone
        say(f"probing {config.method} encoder on {len(train_x)} train / {len(test_x)} test images …")
        probe, metrics = probe_encoder(encoder, train_x, train_y, test_x, test_y, probe_epochs=probe_epochs,
                                       seed=config.seed)

        say("probing the random-init backbone (same seed and architecture) …")
        random_method = build_method(config).eval()
        _, rand = probe_encoder(random_method.backbone, train_x, train_y, test_x, test_y,
                                probe_epochs=probe_epochs, seed=config.seed)

        trained_head = method.classifier_head()  # supervised methods ship the head they trained
        if trained_head is not None:
            head, head_kind = trained_head, "supervised cross-entropy head (trained with the backbone)"
        else:
            head, head_kind = probe, "linear probe on frozen features (standardisation folded in)"
        classifier = ProbedClassifier(encoder, nn.Linear(encoder.out_dim, NUM_CLASSES))
        classifier.head.load_state_dict(head.state_dict())
        classifier.eval()
        shipped_acc = _batched_accuracy(classifier, test_x, test_y)
        extra: dict[str, Any] = {}
        if method.report_tta:
            say("measuring test-time augmentation (mirror; mirror + 1-pixel translations) …")
            extra["tta_accuracy"] = {f"level_{lv}": _batched_accuracy(FlipTranslateTTA(classifier, lv), test_x,
                                                                      test_y) for lv in (1, 2)}
            extra["tta"] = ("none: the shipped classifier is the plain network (what an attack on this entry sees); "
                            "tta_accuracy is the same weights inside models.tta.FlipTranslateTTA, level 1 = mean over "
                            "the image and its mirror, level 2 = airbench's mirror + 1-pixel translations")
        if method.recipe:
            extra["training_recipe"] = method.recipe
        if method.teacher_card:  # a distilled student: what it was distilled from
            extra["teacher"] = dict(method.teacher_card)
            extra["compute"] = ("wall_time_s and train_images_per_s include the frozen teacher's forwards "
                                "on the 2 global views of every image")
        say(f"accuracy {shipped_acc:.4f}, linear probe {metrics['linear_probe_acc']:.4f}, "
            f"kNN {metrics['knn_acc']:.4f}; random init: linear {rand['linear_probe_acc']:.4f}, kNN {rand['knn_acc']:.4f}")
        return classifier, {
            "builder": self.name,
            "method": config.method,
            "backbone": _backbone_name(config),
            "architecture": {"backbone": config.backbone, "width": config.width, "num_classes": NUM_CLASSES,
                             "feature_dim": encoder.out_dim,
                             "parameters": sum(p.numel() for p in encoder.parameters())},
            "input": "images in [0, 1], N×3×32×32; CIFAR-10 normalisation is inside the model",
            "classifier_head": head_kind,
            "accuracy": shipped_acc,
            "linear_probe_acc": shipped_acc if trained_head is not None else metrics["linear_probe_acc"],
            "linear_probe_on_frozen_features_acc": metrics["linear_probe_acc"],
            "linear_probe_train_acc": metrics["linear_probe_train_acc"],
            "knn_acc": metrics["knn_acc"],
            "knn": {"k": 200, "temperature": 0.1, "bank": "full training split, L2-normalised features"},
            "random_init_linear_probe_acc": rand["linear_probe_acc"],
            "random_init_knn_acc": rand["knn_acc"],
            "linear_probe": {"optimizer": "AdamW", "epochs": probe_epochs, "lr": 1e-2, "weight_decay": 1e-4,
                             "batch_size": 1024, "augmentation": "none (frozen features of un-augmented images)"},
            "data": data_desc,
            **extra,
        }


def _batched_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, evaluated in batches without gradients."""
    with torch.no_grad():
        return accuracy(torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]), y)


@register_zoo_builder("clip")
class ZeroShotBuilder(ZooBuilder):
    """CLIP's zero-shot classifier over the class names (prompt ensemble of held-out templates)."""

    def rebuild(self, card: dict[str, Any]) -> nn.Module:
        """The un-initialised zero-shot classifier of a CLIP card (:func:`models.clip.build_from_card`)."""
        from models.clip import build_from_card

        return build_from_card(card)

    def summary(self, card: dict[str, Any]) -> str:
        return f"zero-shot accuracy {card['zero_shot_acc']:.4f}"

    def build(self, method: TrainingMethod, config: TrainConfig, data: Data | None, say: Callable[[str], None],
              probe_epochs: int) -> tuple[nn.Module, dict[str, Any]]:
        """CLIP's zero-shot classifier (held-out prompt templates) with its test-split metrics."""
        from models.captions import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES
        from models.clip import clip_card, zero_shot_classifier
        from models.clip_eval import evaluate_clip

        (test_x, test_y), data_desc = _custom(data, ("test",)) if data is not None else _cifar10(("test",))
        clip, classes = method.clip, method.classes
        say(f"zero-shot evaluation of {config.method} on {len(test_x)} test images …")
        metrics = evaluate_clip(clip, test_x, test_y, classes, HELD_OUT_TEMPLATES, seed=config.seed)
        classifier = zero_shot_classifier(clip, classes, HELD_OUT_TEMPLATES).eval()
        say(f"zero-shot accuracy {metrics['zero_shot_accuracy']:.4f}; retrieval R@1 "
            f"i→t {metrics['image_to_text_recall@1']:.3f} t→i {metrics['text_to_image_recall@1']:.3f}")
        return classifier, {
            **clip_card(classifier),
            "method": config.method,
            "description": "CLIP (Radford et al. 2021) trained on CIFAR-10 with generated captions; "
                           "logits are zero-shot (prompt ensemble of held-out templates)",
            "backbone": _backbone_name(config),
            "input": "images in [0, 1], N×3×32×32; CIFAR-10 normalisation is inside the model",
            "zero_shot_acc": metrics["zero_shot_accuracy"],
            "train_templates": list(TRAIN_TEMPLATES),
            "metrics": {**metrics, "test_images": len(test_x), "split": "test",
                        "note": "zero-shot uses held-out templates never seen in training"},
            "data": data_desc,
        }


def _teacher_zoo_entry(teacher: dict[str, Any], zoo_dir: str | os.PathLike | None) -> dict[str, Any] | None:
    """Name and accuracies of the zoo entry built from the teacher's run, if the zoo has one:
    the entry whose ``train_command`` is the teacher run's (recorded, or rebuilt from its config
    for a run started without one)."""
    from models.zoo import cards

    config = TrainConfig(**teacher["config"])
    for name, card in cards(zoo_dir).items():
        expected = teacher.get("train_command") or _reconstruct_command(config, Path(teacher["run"]), name)
        if card.get("method") == teacher["method"] and card.get("train_command") == expected:
            return {"name": name, **{k: card.get(k) for k in ("accuracy", "linear_probe_acc", "knn_acc", "sha256")}}
    return None


def _reconstruct_command(config: TrainConfig, run_dir: Path, name: str) -> str:
    parts = [f"uap train {config.method}", f"--epochs {config.epochs}", f"--batch-size {config.batch_size}",
             f"--backbone {config.backbone}", f"--width {config.width}", f"--seed {config.seed}",
             f"--lr {config.lr}", f"--weight-decay {config.weight_decay}", f"--optimizer {config.optimizer}",
             f"--warmup-epochs {config.warmup_epochs}", f"--out {run_dir}", f"--zoo {name}"]
    if config.n_train is not None:
        parts.append(f"--n-train {config.n_train}")
    if config.precision != "fp32":
        parts.append(f"--precision {config.precision}")
    parts += [f"-H {k}={json.dumps(v)}" for k, v in config.hparams.items()]
    return " ".join(parts)
