"""DINO distillation: a small student learns from a finished DINO run's frozen teacher through
the one training loop; the teacher never changes and is not saved, the loss is DINO's, bad
teachers are one clear error, and the zoo card records the teacher."""
from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from models import backbones
from models.methods.dino_distill import DINODistill
from models.losses import DINOLoss
from models.train import CKPT_NAME, TrainConfig, build_method, train

N, BATCH = 32, 16  # two steps per epoch
TEACHER_HPARAMS = {"out_dim": 64, "n_local": 2, "warmup_teacher_steps": 0}


def _images(n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.arange(n) % 10


def _config(method: str, backbone: str, epochs: int = 1, **hparams) -> TrainConfig:
    return TrainConfig(method=method, backbone=backbone, width=4, epochs=epochs, batch_size=BATCH, knn_every=0,
                       threads=1, hparams=hparams)


@pytest.fixture(scope="module")
def tiny_vits():
    """``vit_small`` and ``vit_tiny`` by name, at test size (one block, no stochastic depth):
    the teacher is the wider of the two, as in a real distillation."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backbones, "vit_small_cifar",
                   functools.partial(backbones.vit_small_cifar, dim=48, depth=1, heads=2, drop_path=0.0))
        mp.setattr(backbones, "vit_tiny_cifar",
                   functools.partial(backbones.vit_tiny_cifar, dim=32, depth=1, heads=2, drop_path=0.0))
        yield


@pytest.fixture(scope="module")
def teacher_run(tiny_vits, tmp_path_factory):
    """A finished one-epoch DINO run (vit_small at test size) on a handful of images."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("teacher") / "dino"
    train(_config("dino", "vit_small", **TEACHER_HPARAMS), out, data=_images())
    return out


def _distill_config(teacher_run, epochs: int = 1) -> TrainConfig:
    return _config("dino-distill", "vit_tiny", epochs=epochs, teacher=str(teacher_run), n_local=2)


def test_distillation_trains_the_student_only_and_resumes_exactly(teacher_run, tmp_path):
    x, y = _images()
    saved = load_file(str(teacher_run / CKPT_NAME))
    method, state = train(_distill_config(teacher_run, epochs=2), tmp_path / "full", data=(x, y))
    assert state["step"] == 4 and (tmp_path / "full" / CKPT_NAME).is_file()
    # the frozen teacher: the DINO run's EMA teacher, bit for bit, after the student's steps
    for prefix, module in (("teacher_backbone.", method.teacher_backbone), ("teacher_head.", method.teacher_head)):
        for key, value in module.state_dict().items():
            assert torch.equal(value, saved[f"model.{prefix}{key}"]), key
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert method.teacher_backbone.out_dim == 48 and method.backbone.out_dim == 32
    # the student moved away from its initialisation
    fresh = build_method(_distill_config(teacher_run, epochs=2).resolved())
    assert any(not torch.equal(a, b) for a, b in zip(fresh.backbone.parameters(), method.backbone.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(fresh.head.parameters(), method.head.parameters()))
    # the student's checkpoint holds the student, its head and the centre, not the teacher
    keys = load_file(str(tmp_path / "full" / CKPT_NAME)).keys()
    assert not any(k.startswith("model.teacher") for k in keys) and "model.criterion.center" in keys
    # stopped inside the first epoch and resumed: the uninterrupted run's weights exactly
    train(_distill_config(teacher_run, epochs=2), tmp_path / "cut", data=(x, y), max_steps=1)
    resumed, state = train(_distill_config(teacher_run, epochs=2), tmp_path / "cut", data=(x, y), resume=True)
    assert state["step"] == 4
    for (key, a), b in zip(method.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key


def test_loss_is_dino_loss_of_the_student_on_all_views_against_the_frozen_teacher(teacher_run):
    x, _ = _images(8)
    torch.manual_seed(0)
    method = DINODistill(backbones.build_backbone("vit_tiny"), teacher=str(teacher_run), n_local=2).train()
    center = method.criterion.center.clone()
    teacher_center = load_file(str(teacher_run / CKPT_NAME))["model.criterion.center"]
    assert torch.equal(center, teacher_center) and center.abs().sum() > 0  # starts at the teacher run's centre
    torch.manual_seed(5)
    loss = method.training_step(x, None, 0, 10)
    torch.manual_seed(5)  # the same crops, encoded one view at a time
    views = method.multicrop(x)
    assert len(views) == 4
    with torch.no_grad():
        teacher = [method.teacher_head(method.teacher_backbone(v)) for v in views[:2]]
        student = [method.head(method.backbone(v)) for v in views]
        reference = DINOLoss(64, student_temp=0.1, teacher_temp=0.04, warmup_teacher_temp=0.04, warmup_steps=0,
                             center_momentum=0.9)
        reference.center.copy_(center)
        expected = reference(student, teacher, 0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(method.criterion.center, reference.center)  # the same centre update
    loss.backward()
    assert method.backbone.patch_embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.teacher_backbone.parameters())


def test_loading_the_teacher_leaves_the_generators_alone(teacher_run):
    from models.heads import DINOHead

    backbone = backbones.build_backbone("vit_tiny")
    torch.manual_seed(3)
    method = DINODistill(backbone, teacher=str(teacher_run))
    after = torch.get_rng_state()
    torch.manual_seed(3)  # the student's head is all that draws: as if there were no teacher
    head = DINOHead(32, 64)
    assert torch.equal(after, torch.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), method.head.state_dict().values()))


def test_bad_teachers_are_one_clear_error(tiny_vits, teacher_run, tmp_path):
    x, y = _images()
    supervised = tmp_path / "supervised"
    train(_config("supervised", "resnet18"), supervised, data=(x, y))
    unfinished = tmp_path / "unfinished"
    train(_config("dino", "vit_tiny", epochs=2, **TEACHER_HPARAMS), unfinished, data=(x, y), max_steps=1)
    (tmp_path / "empty").mkdir()
    cases = {"": "needs -H teacher=RUN_FOLDER", str(tmp_path / "nope"): "not found",
             str(tmp_path / "empty"): "holds no training run", str(supervised): "is a supervised run",
             str(unfinished): "stopped at epoch 0/2"}
    for teacher, message in cases.items():
        hparams = {"teacher": teacher} if teacher else {}
        with pytest.raises(ValueError, match=message) as error:  # before any data is loaded
            _config("dino-distill", "vit_tiny", **hparams).resolved()
        assert "\n" not in str(error.value)
        with pytest.raises(ValueError, match=message):  # and when the class is used directly
            DINODistill(backbones.build_backbone("vit_tiny"), **hparams)
    DINODistill(backbones.build_backbone("vit_tiny"), teacher=str(teacher_run))  # the good one builds


def test_cli_without_teacher_exits_2_with_one_line(tmp_path):
    from cli import app

    result = CliRunner().invoke(app, ["train", "dino-distill", "--backbone", "vit_tiny", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "teacher" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    help_text = CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output
    assert "dino-distill" in help_text and "vit_tiny" in help_text


def test_zoo_entry_ships_the_student_and_records_the_teacher(teacher_run, tmp_path):
    import models
    from models.zoo_build import build_zoo_entry

    x, y = _images()
    data, zoo = (x, y, x[:16], y[:16]), tmp_path / "zoo"
    teacher_card = build_zoo_entry(teacher_run, "tiny-dino", zoo_dir=zoo, data=data, probe_epochs=2)
    method, _ = train(_distill_config(teacher_run), tmp_path / "student", data=(x, y))
    card = build_zoo_entry(tmp_path / "student", "tiny-distilled", zoo_dir=zoo, data=data, probe_epochs=2)
    assert card["method"] == "dino-distill" and card["builder"] == "probed"
    assert card["architecture"]["backbone"] == "vit_tiny" and card["architecture"]["feature_dim"] == 32
    assert {"linear_probe_acc", "knn_acc", "random_init_linear_probe_acc"} <= set(card)
    teacher = card["teacher"]
    assert teacher["run"] == str(teacher_run) and teacher["method"] == "dino" and teacher["backbone"] == "vit_small"
    assert teacher["zoo_entry"]["name"] == "tiny-dino"
    assert teacher["zoo_entry"]["accuracy"] == teacher_card["accuracy"]
    assert teacher["zoo_entry"]["sha256"] == teacher_card["sha256"]
    assert "teacher" in card["compute"]
    loaded = models.load(zoo / "tiny-distilled.safetensors")
    method.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encoder(x[:4]), method.backbone(x[:4]))
