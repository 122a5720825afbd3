"""CoCa and SimVLM through the one training loop: a few steps lower the loss, exact resume
(inside an epoch), hyper-parameter checks, optimiser groups, and the zoo entry (likelihood
classifier with its caption metrics) that reloads bit for bit."""
from __future__ import annotations

import json

import pytest
import torch

from models.precision import autocast
from models.train import STATE_NAME, TrainConfig, build_method, build_optimizer, train
from tests.test_models_train import _eval_loss
from tests.test_models_train import _images as _blob_images

TINY = {
    "coca": {"embed_dim": 16, "text_width": 32, "text_heads": 2, "unimodal_layers": 1, "multimodal_layers": 1,
             "caption_queries": 4, "val_size": 32},
    "simvlm": {"text_width": 32, "text_heads": 2, "decoder_layers": 1, "val_size": 32},
}
TIMING = ("images_per_s",)


def _config(name: str, **changes) -> TrainConfig:
    base = dict(method=name, width=4, epochs=2, batch_size=32, knn_every=0, threads=1, hparams=TINY[name])
    return TrainConfig(**{**base, **changes})


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.arange(n) % 10


DATA = _images(160, 0)  # 32 held out: 4 steps of 32 per epoch


def _without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMING} for record in history]


@pytest.mark.parametrize("name,precision", [("coca", "fp32"), ("simvlm", "fp32"), ("coca", "bf16")])
def test_a_few_steps_lower_the_loss(name, precision):
    x, y = _blob_images(256)
    torch.manual_seed(0)
    config = _config(name, hparams={**TINY[name], "val_size": 0}).resolved()
    method = build_method(config).train()
    opt = build_optimizer(method, config.optimizer, config.lr * 4, config.weight_decay)
    batches = [(x[:128], y[:128]), (x[128:], y[128:])]
    before = _eval_loss(method, *batches[0])
    for step in range(6):
        with autocast(precision):
            loss = method.training_step(*batches[step % 2], step, 100)
        assert loss.dtype == torch.float32
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step(step, 100)
    after = _eval_loss(method, *batches[0])
    assert after < before, f"{name}: loss {before:.4f} -> {after:.4f}"


@pytest.fixture(scope="module", params=["coca", "simvlm"])
def full_run(request, tmp_path_factory):
    """The uninterrupted two-epoch run: ``(name, run dir, method, state)``."""
    out = tmp_path_factory.mktemp(f"{request.param}_full")
    method, state = train(_config(request.param), out, data=DATA)
    return request.param, out, method, state


def test_a_resumed_run_has_the_weights_of_an_uninterrupted_one(full_run, tmp_path):
    name, _, full, full_state = full_run
    train(_config(name), tmp_path, data=DATA, max_steps=5)  # inside epoch 2
    saved = json.loads((tmp_path / STATE_NAME).read_text())
    assert saved["step"] == 5 and "partial_epoch" in saved
    resumed, state = train(_config(name), tmp_path, data=DATA, resume=True)
    assert state["step"] == full_state["step"] == 8
    sa, sb = full.state_dict(), resumed.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert _without_timing(state["history"]) == _without_timing(full_state["history"])
    expected = {"val_likelihood_accuracy"} | ({"val_zero_shot_accuracy", "logit_scale"} if name == "coca" else set())
    assert set(state["history"][-1]) >= expected
    with pytest.raises(ValueError, match="different configuration"):
        train(_config(name, hparams={**TINY[name], "word_dropout": 0.2}), tmp_path, data=DATA, resume=True)


def test_optimiser_groups_and_the_backbone_stored_once():
    method = build_method(_config("coca").resolved())
    opt = build_optimizer(method, "adamw", 1e-3, 0.1)
    names = {id(p): n for n, p in method.named_parameters()}
    decay, no_decay = opt.param_groups
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert {"captioner.log_logit_scale", "captioner.decoder.token_embedding.weight",
            "captioner.decoder.positional_embedding", "captioner.caption_pooler.query_embedding"} <= undecayed
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["betas"] == (0.9, 0.98)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(method.parameters()))
    assert method.backbone is method.captioner.visual
    assert not any(k.startswith("backbone.") for k in method.state_dict())


def test_hyper_parameters_are_checked_by_name_and_type():
    with pytest.raises(ValueError, match="caption_weight"):
        TrainConfig(method="coca", hparams={"caption_wieght": 1.0}).resolved()
    with pytest.raises(ValueError, match="contrastive_weight for training method 'coca' must be"):
        TrainConfig(method="coca", hparams={"contrastive_weight": "high"}).resolved()
    with pytest.raises(ValueError, match="not both 0"):
        build_method(_config("coca", hparams={**TINY["coca"], "contrastive_weight": 0.0, "caption_weight": 0.0}).resolved())
    with pytest.raises(ValueError, match="text_heads"):
        build_method(_config("simvlm", hparams={**TINY["simvlm"], "text_heads": 3}).resolved())
    with pytest.raises(ValueError, match="decoder_layers"):
        build_method(_config("simvlm", hparams={**TINY["simvlm"], "decoder_layers": 0}).resolved())


def test_the_coca_weights_are_the_options():
    method = build_method(_config("coca", hparams={**TINY["coca"], "contrastive_weight": 0.5,
                                                   "caption_weight": 3.0, "val_size": 0}).resolved())
    x, y = _images(8, 3)
    torch.manual_seed(1)
    loss = method.training_step(x, y, 0, 10)
    torch.manual_seed(1)  # the same captions, word dropout and crops, split into its parts
    from models.augment import random_crop_flip
    from models.captions import TRAIN_TEMPLATES, image_attributes, make_captions
    from models.tokenizer import mask_words

    captions = make_captions(image_attributes(x), y, method.classes, TRAIN_TEMPLATES)
    ids, eot = method.captioner.tokenize(captions)
    inputs = mask_words(ids, eot, method.word_dropout, keep=torch.isin(ids, method.class_token_ids))
    parts = method.captioner.losses(random_crop_flip(x), inputs, eot, targets=ids)
    assert loss.item() == pytest.approx(0.5 * parts["contrastive"].item() + 3.0 * parts["caption"].item(), rel=1e-6)


def test_zoo_entry_reloads_and_its_card_is_reproducible(full_run, tmp_path):
    from models.captioner_zoo import caption_class_rate
    from models.clip_eval import zero_shot_accuracy
    from models.captioner_targets import CaptionLikelihoodClassifier
    from models.zoo import get_zoo_builder, load
    from models.zoo_build import build_zoo_entry

    name, run_dir, method, _ = full_run
    test_x, test_y = _images(40, 1)
    card = build_zoo_entry(run_dir, f"tiny{name}", zoo_dir=tmp_path, data=(*DATA, test_x, test_y))
    assert card["builder"] == name and card["method"] == name
    assert f"uap train {name}" in card["train_command"] and len(card["sample_captions"]) == 10
    assert ("zero_shot_acc" in card) == (name == "coca")
    shipped = load(f"tiny{name}", zoo_dir=tmp_path)
    assert isinstance(shipped, CaptionLikelihoodClassifier)
    for k, v in method.captioner.state_dict().items():
        assert torch.equal(shipped.state_dict()[f"captioner.{k}"], v), k
    assert zero_shot_accuracy(shipped, test_x, test_y, batch_size=250) == card["likelihood_acc"]
    rate, captions = caption_class_rate(shipped.captioner, test_x, test_y, shipped.classes)
    assert rate == card["caption_class_rate"] and shipped.generate(test_x[:2]) == captions[:2]
    assert get_zoo_builder(name).summary(card).startswith("likelihood accuracy")
