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
    with pytest.raises(ValueError, match="unknown simclr hyper-parameter.*known: temperature, proj_dim, hidden_dim"):
        TrainConfig(method="simclr", hparams={"temp": 0.5}).resolved()
    with pytest.raises(ValueError, match="temperature must be float"):
        TrainConfig(method="simclr", hparams={"temperature": "hot"}).resolved()
    with pytest.raises(ValueError, match="queue_size must be int"):
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
