"""Training methods and the loop: a few steps lower each loss; checkpoints resume exactly."""
from __future__ import annotations

import json

import pytest
import torch

from models.precision import autocast
from models.train import CKPT_NAME, STATE_NAME, TrainConfig, build_method, build_optimizer, train


def _images(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic images with class structure (a class-specific colour blob), so the test needs
    no dataset and the supervised loss has something to learn."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = 0.3 * torch.rand(n, 3, 32, 32, generator=g)
    colours = torch.rand(10, 3, 1, 1, generator=g)
    rows = (y * 3) % 24
    for c in range(10):  # batched per class, not per image
        idx = (y == c).nonzero().squeeze(1)
        x[idx, :, rows[idx[0]]:rows[idx[0]] + 8, 4:28] = colours[c]
    return x.clamp(0, 1), y


def _eval_loss(method, x, y, seed=123):
    """The training loss on fixed augmentations, leaving queue/centre/RNG untouched."""
    state = {k: v.clone() for k, v in method.state_dict().items()}
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        loss = method.training_step(x, y, 0, 100).item()
    method.load_state_dict(state)
    return loss


HPARAMS = {"moco": {"queue_size": 256}, "dino": {"out_dim": 64, "n_local": 2, "warmup_teacher_steps": 0, "momentum": 1.0, "center_momentum": 1.0},
           "clip": {"embed_dim": 32, "text_width": 32, "text_layers": 1, "text_heads": 2, "val_size": 0}}


@pytest.mark.parametrize("name,precision", [("supervised", "fp32"), ("simclr", "fp32"), ("moco", "fp32"),
                                            ("byol", "fp32"), ("dino", "fp32"), ("clip", "fp32"),
                                            ("simclr", "bf16"), ("byol", "bf16"), ("clip", "bf16")])
def test_a_few_steps_lower_the_loss(name, precision):
    torch.set_num_threads(2)
    x, y = _images(256)
    torch.manual_seed(0)  # the same initial weights whatever ran before
    config = TrainConfig(method=name, width=4, hparams=HPARAMS.get(name, {})).resolved()
    method = build_method(config).train()
    # AdamW's first updates have size ≈ lr for every weight; DINO's sharpened cross-entropy
    # overshoots at 4× its base lr on these tiny batches, so it takes a smaller step.
    lr_scale = 0.25 if name == "dino" else 4
    opt = build_optimizer(method, config.optimizer, config.lr * lr_scale, config.weight_decay)
    torch.manual_seed(0)
    batches = [(x[:128], y[:128]), (x[128:], y[128:])]
    if name == "moco":  # fill the queue with real keys first, so before/after compare like with like
        with torch.no_grad():
            method.training_step(*batches[0], 0, 100)
            method.training_step(*batches[1], 0, 100)
    before = _eval_loss(method, *batches[0])
    # DINO's target moves with the centre and the EMA teacher; compare the student against the
    # same (initial) teacher and centre, which is the objective each step descends.
    frozen = {k: v.clone() for k, v in method.state_dict().items() if k.startswith(("teacher_", "criterion."))}
    for step in range(6):
        with autocast(precision):
            loss = method.training_step(*batches[step % 2], step, 100)
        assert loss.dtype == torch.float32
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step(step, 100)
    if name == "dino":
        method.load_state_dict({**method.state_dict(), **frozen})
    after = _eval_loss(method, *batches[0])
    assert after < before, f"{name}: loss {before:.4f} -> {after:.4f}"


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    x, y = _images(128)
    cfg = TrainConfig(method="supervised", width=4, epochs=2, batch_size=64, knn_every=0, threads=1)
    full, _ = train(cfg, tmp_path / "full", data=(x, y))
    train(TrainConfig(**{**cfg.__dict__, "epochs": 2}), tmp_path / "split", data=(x, y), max_steps=2)
    state = json.loads((tmp_path / "split" / STATE_NAME).read_text())
    assert state["epoch"] == 1 and state["step"] == 2 and (tmp_path / "split" / CKPT_NAME).is_file()
    resumed, state = train(cfg, tmp_path / "split", data=(x, y), resume=True)
    assert state["epoch"] == 2 and len(state["history"]) == 2
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k


def test_resume_refuses_a_different_configuration(tmp_path):
    x, y = _images(128)
    cfg = TrainConfig(method="supervised", width=4, epochs=1, batch_size=64, knn_every=0, threads=1,
                      warmup_epochs=0.0)
    train(cfg, tmp_path, data=(x, y))
    with pytest.raises(ValueError, match="different configuration"):
        train(TrainConfig(**{**cfg.__dict__, "seed": 1}), tmp_path, data=(x, y), resume=True)
    with pytest.raises(FileNotFoundError):
        train(cfg, tmp_path / "missing", data=(x, y), resume=True)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown method"):
        TrainConfig(method="swav").resolved()
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(method="simclr", optimizer="rmsprop").resolved()
    assert TrainConfig(method="simclr", optimizer="lars").resolved().optimizer == "lars"
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(method="simclr", precision="fp16").resolved()
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['temp'\] for training method 'simclr'; "
                                         r"known: temperature, proj_dim, hidden_dim"):
        TrainConfig(method="simclr", hparams={"temp": 0.5}).resolved()
    with pytest.raises(ValueError, match="option temperature for training method 'simclr' must be a number"):
        TrainConfig(method="simclr", hparams={"temperature": "hot"}).resolved()
    with pytest.raises(ValueError, match="option queue_size for training method 'moco' must be an integer, got 256.5"):
        TrainConfig(method="moco", hparams={"queue_size": 256.5}).resolved()
    assert TrainConfig(method="simclr", hparams={"temperature": 1}).resolved().hparams == {"temperature": 1}


def test_resume_reads_a_checkpoint_without_precision_as_fp32(tmp_path):
    x, y = _images(128)
    cfg = TrainConfig(method="supervised", width=4, epochs=2, batch_size=64, knn_every=0, threads=1)
    train(cfg, tmp_path, data=(x, y), max_steps=2)
    state = json.loads((tmp_path / STATE_NAME).read_text())
    del state["config"]["precision"]
    (tmp_path / STATE_NAME).write_text(json.dumps(state))
    _, state = train(cfg, tmp_path, data=(x, y), resume=True)
    assert state["epoch"] == 2
    with pytest.raises(ValueError, match="precision"):
        train(TrainConfig(**{**cfg.__dict__, "precision": "bf16"}), tmp_path, data=(x, y), resume=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_train_on_a_missing_device_is_a_clear_error(tmp_path):
    cfg = TrainConfig(method="supervised", width=4, epochs=1, batch_size=64, knn_every=0, threads=1)
    x, y = _images(128)
    with pytest.raises(ValueError, match="CUDA is not available"):
        train(cfg, tmp_path, data=(x, y), device="cuda")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------- registries


@pytest.fixture
def registries(monkeypatch):
    """The training-method and zoo-builder registries, restored after the test (built-ins loaded first)."""
    from models import zoo
    from models.methods import available_training_methods, base

    available_training_methods(), zoo.zoo_builders()
    monkeypatch.setattr(base, "_METHODS", dict(base._METHODS))
    monkeypatch.setattr(zoo, "_BUILDERS", dict(zoo._BUILDERS))


def _flip_prediction_method():
    """A training method that is one Options class, one TrainingMethod class and one registration:
    predict which of ``flips`` fixed transforms (identity, mirror, upside down …) an image got."""
    from dataclasses import dataclass

    import torch.nn.functional as F
    from torch import nn

    from models.methods import TrainingMethod, register_training_method
    from uap.options import Options, require

    @dataclass(frozen=True)
    class FlipOptions(Options):
        flips: int = 4
        scale: float = 1.0

        def check(self) -> None:
            require(2 <= self.flips <= 4, f"flips must be 2, 3 or 4, got {self.flips}")

    @register_training_method()
    class FlipPrediction(TrainingMethod):
        name, Options = "test-flips", FlipOptions
        defaults = {"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "warmup_epochs": 0.5}

        def __init__(self, backbone, options=None, **hparams):
            super().__init__(backbone, options, **hparams)
            self.head = nn.Linear(backbone.out_dim, self.options.flips)

        def training_step(self, x, y, step, max_steps):
            k = torch.randint(self.options.flips, (len(x),), device=x.device)  # the loop checkpoints the generator
            views = [x, x.flip(-1), x.flip(-2), x.flip(-1, -2)]
            flipped = torch.stack(views)[k, torch.arange(len(x))]
            return F.cross_entropy(self.head(self.backbone(flipped)) * self.options.scale, k)

    return FlipPrediction


def test_a_new_training_method_is_one_class_and_one_registration(registries, tmp_path):
    from models.methods import available_training_methods, get_training_method

    cls = _flip_prediction_method()
    assert get_training_method("test-flips") is cls and "test-flips" in available_training_methods()
    x, y = _images(96)
    cfg = TrainConfig(method="test-flips", width=4, epochs=2, batch_size=32, knn_every=0, threads=1,
                      hparams={"flips": 3, "scale": 2})
    full, full_state = train(cfg, tmp_path / "full", data=(x, y))
    assert [r["epoch"] for r in full_state["history"]] == [1, 2] and full.hparams == {"flips": 3, "scale": 2}
    train(cfg, tmp_path / "split", data=(x, y), max_steps=4)  # stopped inside the second epoch
    state = json.loads((tmp_path / "split" / STATE_NAME).read_text())
    assert state["step"] == 4 and state["config"]["hparams"] == {"flips": 3, "scale": 2}
    resumed, resumed_state = train(cfg, tmp_path / "split", data=(x, y), resume=True)
    assert resumed_state["step"] == 6 and [r["loss"] for r in resumed_state["history"]] == \
        [r["loss"] for r in full_state["history"]]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k  # the one loop resumes the new method exactly
    for hparams, message in [({"flip": 3}, r"unknown option\(s\) \['flip'\] for training method 'test-flips'; "
                                           r"known: flips, scale"),
                             ({"flips": "three"}, "option flips for training method 'test-flips' must be an integer"),
                             ({"flips": 5}, "flips must be 2, 3 or 4, got 5")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(method="test-flips", hparams=hparams).resolved()


def test_a_method_names_its_zoo_builder_and_a_new_builder_is_one_registration(registries, tmp_path):
    from torch import nn

    import models
    from models.probes import ProbedClassifier
    from models.zoo import ZooBuilder, register_zoo_builder
    from models.zoo_build import build_zoo_entry

    @register_zoo_builder("test-flip-head")
    class FlipHeadBuilder(ZooBuilder):
        """Ships the backbone with a fresh 10-class head; the card records the flip head's size."""

        def rebuild(self, card):
            from models.backbones import build_backbone

            encoder = build_backbone("resnet18", card["width"])
            return ProbedClassifier(encoder, nn.Linear(encoder.out_dim, 10))

        def build(self, method, config, data, say, probe_epochs):
            torch.manual_seed(config.seed)
            classifier = ProbedClassifier(method.backbone, nn.Linear(method.backbone.out_dim, 10)).eval()
            say("shipping the backbone with a fresh head")
            return classifier, {"builder": self.name, "method": config.method, "width": config.width,
                                "flip_classes": method.options.flips}

        def summary(self, card):
            return f"{card['flip_classes']} flip classes"

    cls = _flip_prediction_method()
    cls.zoo_builder = "test-flip-head"
    x, y = _images(64)
    cfg = TrainConfig(method="test-flips", width=4, epochs=1, batch_size=32, knn_every=0, threads=1,
                      hparams={"flips": 2})
    method, _ = train(cfg, tmp_path / "run", data=(x, y))
    card = build_zoo_entry(tmp_path / "run", "flips", zoo_dir=tmp_path / "zoo", data=(x, y, x, y))
    assert card["builder"] == "test-flip-head" and card["hyperparameters"]["method_hparams"] == {"flips": 2, "scale": 1.0}
    assert models.zoo.get_zoo_builder(card["builder"]).summary(card) == "2 flip classes"
    loaded = models.load("flips", zoo_dir=tmp_path / "zoo")
    assert torch.equal(loaded.encoder(x[:4]), method.backbone.eval()(x[:4]))
