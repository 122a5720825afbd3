"""CLIP model: temperature, zero-shot head (vs explicit prompt ensembling), differentiability
and DeepFool, zoo round trip and the shipped zoo checkpoint. Training CLIP through the loop
(exact resume, zoo entry) is tested in ``test_train_clip.py``."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.captions import HELD_OUT_TEMPLATES, all_training_captions, class_prompts
from models.clip import CLIP, CLIPConfig, ZeroShotClassifier, build_from_card, clip_card, zero_shot_classifier
from models.tokenizer import WordTokenizer
from uap.data import CIFAR10_CLASSES

TINY = dict(width=4, embed_dim=16, text_width=16, text_layers=1, text_heads=2)
ZOO = Path(__file__).resolve().parents[1] / "models" / "zoo"


@pytest.fixture(scope="module")
def tiny_clip() -> CLIP:
    torch.manual_seed(0)
    tok = WordTokenizer.build(all_training_captions(CIFAR10_CLASSES), context_length=16)
    return CLIP(CLIPConfig(**TINY), tok).eval()


def test_logit_scale_starts_at_one_over_007_and_is_clamped_at_100(tiny_clip):
    assert tiny_clip.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    model = CLIP(CLIPConfig(**TINY), tiny_clip.tokenizer)
    with torch.no_grad():
        model.log_logit_scale.fill_(10.0)
    assert model.logit_scale.item() == pytest.approx(100.0)
    model.clamp_logit_scale_()
    assert model.log_logit_scale.item() == pytest.approx(math.log(100.0))


def test_forward_is_scaled_cosine_of_both_encoders(tiny_clip):
    x = torch.rand(3, 3, 32, 32)
    texts = ["a red cat.", "a dog.", "a ship on a blue background."]
    with torch.no_grad():
        per_image, per_text = tiny_clip(x, *tiny_clip.tokenize(texts))
        img, txt = tiny_clip.encode_image(x), tiny_clip.encode_text(texts)
    expected = tiny_clip.logit_scale * F.cosine_similarity(img[:, None], txt[None], dim=-1)
    assert torch.allclose(per_image, expected, atol=1e-5) and torch.equal(per_text, per_image.T)


def test_zero_shot_weights_are_the_explicit_prompt_ensemble(tiny_clip):
    clf = zero_shot_classifier(tiny_clip, CIFAR10_CLASSES, HELD_OUT_TEMPLATES)
    with torch.no_grad():
        for c, prompts in enumerate(class_prompts(CIFAR10_CLASSES, HELD_OUT_TEMPLATES)):
            acc = torch.zeros(16)
            for p in prompts:  # one prompt at a time: independent of the batched path
                e = tiny_clip.encode_text([p])[0]
                acc += e / e.norm()
            mean = acc / len(prompts)
            assert torch.allclose(clf.class_weights[c], mean / mean.norm(), atol=1e-5)
        x = torch.rand(4, 3, 32, 32)
        img = tiny_clip.encode_image(x)
        expected = tiny_clip.logit_scale * (img / img.norm(dim=1, keepdim=True)) @ clf.class_weights.T
        assert torch.allclose(clf(x), expected, atol=1e-5)
        assert torch.allclose(clf.encoder(x).norm(dim=1), torch.ones(4), atol=1e-5)
    assert set(clf.state_dict()) == {f"clip.{k}" for k in tiny_clip.state_dict()} | {"class_weights"}


def test_zero_shot_classifier_is_differentiable_end_to_end(tiny_clip):
    clf = zero_shot_classifier(tiny_clip, CIFAR10_CLASSES)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    logits = clf(x)
    (g,) = torch.autograd.grad(logits[:, 1].sum(), x)
    assert torch.isfinite(g).all() and g.abs().amax() > 0
    # finite-difference check of the input gradient along a random direction (float64)
    clf64 = zero_shot_classifier(CLIP(CLIPConfig(**TINY), tiny_clip.tokenizer).double().eval(), CIFAR10_CLASSES)
    x64 = torch.rand(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    (g64,) = torch.autograd.grad(clf64(x64)[0, 2], x64)
    v, h = torch.randn_like(x64), 1e-6
    with torch.no_grad():
        fd = (clf64(x64 + h * v)[0, 2] - clf64(x64 - h * v)[0, 2]) / (2 * h)
    assert (g64 * v).sum().item() == pytest.approx(fd.item(), rel=1e-4, abs=1e-7)


def test_engine_deepfool_flips_zero_shot_predictions(tiny_clip):
    deepfool = pytest.importorskip("uap.deepfool").deepfool
    clf = zero_shot_classifier(tiny_clip, CIFAR10_CLASSES).eval()
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    r, success = deepfool(clf, x, norm=2, candidates=3, max_iter=50)
    assert success.float().mean() >= 5 / 6
    with torch.no_grad():
        flipped = clf((x + r).clamp(0, 1)).argmax(1) != clf(x).argmax(1)
    assert torch.equal(flipped, success)


def test_foolbox_deepfool_runs_on_zero_shot_classifier(tiny_clip):
    fb = pytest.importorskip("foolbox")
    clf = zero_shot_classifier(tiny_clip, CIFAR10_CLASSES).eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.6 + 0.2
    with torch.no_grad():
        labels = clf(x).argmax(1)
    fmodel = fb.PyTorchModel(clf, bounds=(0, 1))
    _, adv, success = fb.attacks.L2DeepFoolAttack(steps=50, candidates=3)(fmodel, x, labels, epsilons=None)
    assert success.float().mean() >= 0.75
    assert ((adv - x).flatten(1).norm(dim=1) > 0).all()


def test_zoo_round_trip_through_the_registry(tiny_clip, tmp_path):
    from models.zoo import load, save_entry

    clf = zero_shot_classifier(tiny_clip, CIFAR10_CLASSES)
    save_entry("tinyclip", clf, {**clip_card(clf), "metrics": {}}, zoo_dir=tmp_path)
    card = json.loads((tmp_path / "tinyclip.json").read_text())
    assert card["builder"] == "clip"
    again = load("tinyclip", zoo_dir=tmp_path)
    assert isinstance(again, ZeroShotClassifier) and hasattr(again, "encoder")
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(again(x), clf(x), atol=1e-6)
        assert torch.allclose(again.clip.encode_text(["a cat."]), tiny_clip.encode_text(["a cat."]), atol=1e-6)
    with pytest.raises(ValueError, match="config"):
        build_from_card({"builder": "clip", "tokenizer": card["tokenizer"], "classes": card["classes"]})


@pytest.mark.skipif(not (ZOO / "clip.safetensors").is_file(), reason="zoo entry models/zoo/clip not built yet")
def test_zoo_checkpoint_reproduces_its_card(data_root):
    from models.clip_eval import zero_shot_accuracy
    from models.zoo import load
    from uap.data import load as load_data

    model = load("clip")
    x, y, _ = load_data("cifar10", "test", n=1000, seed=0)
    acc = zero_shot_accuracy(model, x, y)
    card_acc = model.card["metrics"]["zero_shot_accuracy"]
    assert abs(acc - card_acc) <= 0.03, (acc, card_acc)
    assert tuple(model.templates) == tuple(model.card["zero_shot_templates"])
