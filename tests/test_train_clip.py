"""CLIP through the one training loop: exact resume (after an epoch and inside one), the shared
resume rule, its hooks (parameter groups, held-out validation), hyper-parameter checks and
the zoo entry with the zero-shot card."""
from __future__ import annotations

import json

import pytest
import torch

from models.train import STATE_NAME, TrainConfig, build_method, build_optimizer, train

TINY = {"embed_dim": 16, "text_width": 16, "text_layers": 1, "text_heads": 2, "val_size": 32}
# 160 images, 32 held out: 4 steps of 32 per epoch; warm-up is the first epoch (steps 0-3).
CFG = TrainConfig(method="clip", width=4, epochs=2, batch_size=32, knn_every=0, threads=1, hparams=TINY)
TIMING = ("images_per_s",)


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.arange(n) % 10


DATA = _images(160, 0)


def _config(**changes) -> TrainConfig:
    return TrainConfig(**{**CFG.__dict__, **changes})


def _without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMING} for record in history]


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted two-epoch run: ``(run dir, method, state)``."""
    out = tmp_path_factory.mktemp("clip_full")
    method, state = train(CFG, out, data=DATA)
    return out, method, state


@pytest.mark.parametrize("stop", [4, 5], ids=["after-epoch-1", "inside-epoch-2"])
def test_resumed_clip_run_has_the_weights_of_an_uninterrupted_one(full_run, tmp_path, stop):
    _, full, full_state = full_run
    train(CFG, tmp_path, data=DATA, max_steps=stop)
    saved = json.loads((tmp_path / STATE_NAME).read_text())
    assert saved["step"] == stop and saved["epoch"] == 1
    assert ("partial_epoch" in saved) == (stop % 4 != 0)
    resumed, state = train(CFG, tmp_path, data=DATA, resume=True)
    assert state["step"] == full_state["step"] == 8 and state["epoch"] == 2
    _assert_same_weights(full, resumed)
    # the same losses, zero-shot validation and 1/τ per epoch: the same captions, word dropout and crops
    assert _without_timing(state["history"]) == _without_timing(full_state["history"])
    assert {"val_zero_shot_accuracy", "logit_scale"} <= set(state["history"][-1])


def test_clip_resume_follows_the_shared_rule(tmp_path):
    train(CFG, tmp_path / "past", data=DATA, max_steps=5)  # step 5 > warm-up (4 steps)
    with pytest.raises(ValueError, match=r"different configuration \(epochs\)"):
        train(_config(epochs=3), tmp_path / "past", data=DATA, resume=True)
    with pytest.raises(ValueError, match=r"different configuration \(lr\)"):
        train(_config(lr=1.0), tmp_path / "past", data=DATA, resume=True)
    with pytest.raises(ValueError, match="different configuration"):
        train(_config(hparams={**TINY, "word_dropout": 0.2}), tmp_path / "past", data=DATA, resume=True)

    # inside warm-up the length may change, and the result is that of a fresh run of the new length
    train(CFG, tmp_path / "early", data=DATA, max_steps=3)
    retimed, state = train(_config(epochs=3), tmp_path / "early", data=DATA, resume=True)
    fresh, fresh_state = train(_config(epochs=3), tmp_path / "fresh", data=DATA)
    assert state["epoch"] == 3
    _assert_same_weights(fresh, retimed)
    assert _without_timing(state["history"]) == _without_timing(fresh_state["history"])


def test_clip_holds_out_validation_images_and_trains_on_the_rest():
    method = build_method(CFG.resolved())
    x, y = DATA
    tx, ty = method.prepare_data(x, y)
    vx, vy = method._val
    assert len(tx) == 128 and len(vx) == 32
    counts = torch.bincount(vy, minlength=10)
    assert counts.max() - counts.min() <= 1  # class-balanced
    rows = lambda t: {r.numpy().tobytes() for r in t}  # noqa: E731
    assert not rows(vx) & rows(tx) and len(rows(vx) | rows(tx)) == len(x)  # a partition of the images
    again, _ = build_method(CFG.resolved()).prepare_data(x, y)
    assert torch.equal(again, tx)  # deterministic: a resumed run trains on the same images
    with pytest.raises(ValueError, match="val_size"):
        build_method(_config(hparams={**TINY, "val_size": 160}).resolved()).prepare_data(x, y)
    assert build_method(_config(hparams={**TINY, "val_size": 0}).resolved()).prepare_data(x, y)[0] is x


def test_clip_optimiser_groups_come_from_the_method():
    method = build_method(CFG.resolved())
    opt = build_optimizer(method, "adamw", 1e-3, 0.1)
    names = {id(p): n for n, p in method.named_parameters()}
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == no_decay["betas"] == (0.9, 0.98) and decay["eps"] == 1e-6
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert {"clip.log_logit_scale", "clip.text.token_embedding.weight", "clip.text.positional_embedding"} <= undecayed
    assert all(p.ndim >= 2 for p in decay["params"])
    assert "clip.image_projection.weight" in {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(method.parameters()))
    assert "backbone.stem.0.weight" not in method.state_dict()  # the backbone is stored once, as clip.visual
    assert method.backbone is method.clip.visual


def test_clip_hyper_parameters_are_checked_by_name_and_type():
    with pytest.raises(ValueError, match="known: embed_dim, text_width, text_layers, text_heads, word_dropout, val_size"):
        TrainConfig(method="clip", hparams={"context_length": 8}).resolved()
    with pytest.raises(ValueError, match="embed_dim for training method 'clip' must be an integer"):
        TrainConfig(method="clip", hparams={"embed_dim": "wide"}).resolved()
    with pytest.raises(ValueError, match="word_dropout"):
        build_method(_config(hparams={**TINY, "word_dropout": 1.5}).resolved())
    with pytest.raises(ValueError, match="text_heads"):
        build_method(_config(hparams={**TINY, "text_heads": 3}).resolved())


def test_clip_zoo_entry_has_the_zero_shot_card_and_reloads(full_run, tmp_path):
    from models.clip_eval import zero_shot_accuracy
    from models.zoo import load
    from models.zoo_build import build_zoo_entry

    run_dir, method, _ = full_run
    test_x, test_y = _images(60, 1)
    card = build_zoo_entry(run_dir, "tinyclip", zoo_dir=tmp_path, data=(*DATA, test_x, test_y))
    assert card["builder"] == "clip" and card["method"] == "clip" and len(card["history"]) == 2
    assert {"zero_shot_accuracy", "image_to_text_recall@1", "text_to_image_recall@1"} <= set(card["metrics"])
    assert card["metrics"]["test_images"] == 60 and card["zero_shot_acc"] == card["metrics"]["zero_shot_accuracy"]
    assert "uap train clip" in card["train_command"] and "-H val_size=32" in card["train_command"]
    assert card["hyperparameters"]["method_hparams"] == {**TINY, "word_dropout": 0.05}

    shipped = load("tinyclip", zoo_dir=tmp_path)
    trained = {f"clip.{k}": v for k, v in method.clip.state_dict().items()}
    for k, v in trained.items():
        assert torch.equal(shipped.state_dict()[k], v), k  # the entry holds the run's final weights
    assert zero_shot_accuracy(shipped, test_x, test_y) == card["zero_shot_acc"]  # the card is reproducible
    assert json.loads((tmp_path / "tinyclip.json").read_text())["sha256"] == card["sha256"]
