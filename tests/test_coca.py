"""CoCa and the SimVLM-style captioner as models: shapes, causal masking, what depends on the
image, the loss against an independent computation, greedy generation, the likelihood and
zero-shot classifiers (against explicit loops, and under the engine), and the caption-level
attack objective. Training through the loop is tested in ``test_train_coca.py``."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.backbones import build_backbone
from models.captions import HELD_OUT_TEMPLATES, all_training_captions, class_prompts
from models.clip_loss import clip_loss
from models.captioner_targets import CaptionLikelihoodClassifier, caption_attack_loss, coca_zero_shot_classifier
from models.coca import CLASS_ONLY_TEMPLATES, CaptionerConfig, Captioner, image_tokens
from models.tokenizer import WordTokenizer
from uap.data import CIFAR10_CLASSES

COCA = dict(width=4, text_width=32, text_heads=2, unimodal_layers=1, multimodal_layers=1, caption_queries=4,
            embed_dim=16)
SIMVLM = dict(width=4, text_width=32, text_heads=2, unimodal_layers=0, multimodal_layers=2, caption_queries=0,
              contrastive=False)
CAPTIONS = ["a red cat.", "a dog.", "this is a ship on a blue background."]


@pytest.fixture(scope="module")
def tokenizer() -> WordTokenizer:
    return WordTokenizer.build(all_training_captions(CIFAR10_CLASSES), context_length=16)


def _model(tokenizer, kind: str = "coca", seed: int = 0, dtype=torch.float32) -> Captioner:
    torch.manual_seed(seed)
    return Captioner(CaptionerConfig(**(COCA if kind == "coca" else SIMVLM)), tokenizer).to(dtype).eval()


def _images(n: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("kind", ["coca", "simvlm"])
def test_shapes(tokenizer, kind):
    model = _model(tokenizer, kind)
    x = _images(3)
    ids, eot = model.tokenize(CAPTIONS)
    logits, image_emb, text_emb = model(x, ids, eot)
    length = int(eot.max()) + 1
    assert logits.shape == (3, length - 1, len(tokenizer))
    context, _ = model.image_context(x)
    # CoCa's decoder reads its 4 pooled queries; SimVLM's every one of the 16 ResNet tokens
    assert context.shape == (3, 4 if kind == "coca" else 16, 32)
    if kind == "coca":
        assert image_emb.shape == text_emb.shape == (3, 16)
    else:
        assert image_emb is None and text_emb is None
        with pytest.raises(ValueError, match="no contrastive head"):
            model.encode_text(CAPTIONS)
    assert model.log_likelihood(x, ids, eot).shape == (3,)


def test_image_tokens_are_the_feature_map_the_backbone_pools():
    x = _images(2)
    resnet = build_backbone("resnet18", width=4).eval()
    tokens = image_tokens(resnet, x)
    assert tokens.shape == (2, 16, resnet.out_dim)
    assert torch.allclose(tokens.mean(1), resnet(x), atol=1e-6)  # global average pooling of the tokens
    vit = build_backbone("vit_tiny").eval()
    tokens = image_tokens(vit, x)
    assert tokens.shape == (2, 65, vit.out_dim) and torch.allclose(tokens[:, 0], vit(x), atol=1e-6)  # [CLS] first
    airbench = build_backbone("airbench", width=4).eval()
    assert torch.allclose(image_tokens(airbench, x).amax(1), airbench(x), atol=1e-6)  # global max-pooling
    with pytest.raises(ValueError, match="no image tokens"):
        image_tokens(torch.nn.Linear(3, 3), x)


@pytest.mark.parametrize("kind", ["coca", "simvlm"])
def test_changing_a_later_token_never_changes_an_earlier_position(tokenizer, kind):
    model = _model(tokenizer, kind)
    x = _images(2)
    ids, eot = model.tokenize(["a photo of a red cat.", "a photo of a red cat."])
    length = int(eot[0]) + 1
    with torch.no_grad():
        base, _, base_text = model(x, ids, eot)
        for k in range(1, length - 1):
            changed = ids.clone()
            changed[:, k] = tokenizer.stoi["truck"] if ids[0, k] != tokenizer.stoi["truck"] else tokenizer.stoi["dog"]
            out, _, text = model(x, changed, eot)
            # logits at position t predict token t+1 from tokens <= t
            assert torch.equal(out[:, :k], base[:, :k]), k
            assert not torch.allclose(out[:, k:], base[:, k:]), k
            if kind == "coca":  # the <eot> embedding sees every word
                assert not torch.allclose(text, base_text)


def test_the_text_embedding_ignores_the_image_and_the_decoder_does_not(tokenizer):
    model = _model(tokenizer, "coca")
    ids, eot = model.tokenize(CAPTIONS)
    with torch.no_grad():
        logits_a, image_a, text_a = model(_images(3, 0), ids, eot)
        logits_b, image_b, text_b = model(_images(3, 1), ids, eot)
        assert torch.equal(text_a, text_b) and torch.equal(text_a, model.encode_text(CAPTIONS))
        assert not torch.allclose(image_a, image_b)
        assert (logits_a - logits_b).abs().amax() > 1e-4  # cross-attention reads the image
    simvlm = _model(tokenizer, "simvlm")
    with torch.no_grad():
        assert (simvlm(_images(3, 0), ids, eot)[0] - simvlm(_images(3, 1), ids, eot)[0]).abs().amax() > 1e-4


@pytest.mark.parametrize("weights", [(1.0, 2.0), (0.3, 0.0), (0.0, 1.5)])
def test_loss_is_weighted_contrastive_plus_caption_cross_entropy(tokenizer, weights):
    model = _model(tokenizer, "coca", dtype=torch.float64)
    x = _images(3, dtype=torch.float64)
    ids, eot = model.tokenize(CAPTIONS)
    with torch.no_grad():
        logits, image_emb, text_emb = model(x, ids, eot)
        # the captioning loss, one caption and one target token at a time
        per_caption = []
        for i in range(3):
            targets = [F.cross_entropy(logits[i, t - 1], ids[i, t]) for t in range(1, int(eot[i]) + 1)]
            per_caption.append(sum(targets) / len(targets))
        ce = sum(per_caption) / 3
        contrastive = clip_loss(model.encode_image(x), model.encode_text(CAPTIONS), model.logit_scale)
        parts = model.losses(x, ids, eot)
        total = model.loss(x, ids, eot, *weights)
    assert parts["caption"].item() == pytest.approx(ce.item(), abs=1e-10)
    assert parts["contrastive"].item() == pytest.approx(contrastive.item(), abs=1e-10)
    assert total.item() == pytest.approx(weights[0] * contrastive.item() + weights[1] * ce.item(), abs=1e-10)
    assert image_emb.shape == text_emb.shape  # embeddings used by the loss are forward's


def test_simvlm_loss_is_the_caption_loss_alone(tokenizer):
    model = _model(tokenizer, "simvlm")
    x, (ids, eot) = _images(3), model.tokenize(CAPTIONS)
    with torch.no_grad():
        parts = model.losses(x, ids, eot)
        assert set(parts) == {"caption"}
        assert model.loss(x, ids, eot, 0.0, 1.0).item() == parts["caption"].item()
    with pytest.raises(ValueError, match="contrastive_weight must be 0"):
        model.loss(x, ids, eot, 1.0, 1.0)


def test_targets_other_than_the_inputs_are_what_the_loss_predicts(tokenizer):
    model = _model(tokenizer, "coca")
    x, (ids, eot) = _images(3), model.tokenize(CAPTIONS)
    inputs = ids.clone()
    inputs[:, 1] = tokenizer.unk_id
    with torch.no_grad():
        logits, _, _ = model(x, inputs, eot)
        mask = torch.arange(1, logits.shape[1] + 1)[None] <= eot[:, None]
        nll = -torch.log_softmax(logits, -1).gather(-1, ids[:, 1:logits.shape[1] + 1, None]).squeeze(-1)
        expected = ((nll * mask).sum(1) / eot).mean()
        assert model.losses(x, inputs, eot, targets=ids)["caption"].item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["coca", "simvlm"])
def test_generate_is_deterministic_and_stops_at_eot_or_the_cap(tokenizer, kind):
    model = _model(tokenizer, kind)
    x = _images(4)
    first, again = model.generate(x), model.generate(x)
    assert first == again and len(first) == 4
    ids, ends = model.generate_ids(x)
    assert ids.shape[1] <= 16 and (ids[:, 0] == tokenizer.sot_id).all()
    for row, end in zip(ids, ends):
        assert not torch.isin(row[1:end], torch.tensor([tokenizer.pad_id, tokenizer.sot_id, tokenizer.unk_id])).any()
        if row[end] == tokenizer.eot_id:
            assert (row[end + 1:] == tokenizer.pad_id).all()  # nothing after <eot>
    assert model.generate(x) == [tokenizer.decode(r) for r in ids]
    # the length cap
    short, short_ends = model.generate_ids(x, max_tokens=3)
    assert short.shape[1] <= 4 and (short_ends <= 3).all()
    with pytest.raises(ValueError, match="max_tokens"):
        model.generate(x, max_tokens=16)
    # a head that always says <eot> stops after one step, one that always says "cat" runs to the cap
    with torch.no_grad():
        model.decoder.head.weight.zero_()
        model.decoder.head.bias.zero_()
        model.decoder.head.bias[tokenizer.eot_id] = 10.0
        ids, ends = model.generate_ids(x)
        assert ids.shape == (4, 2) and (ends == 1).all() and model.generate(x) == [""] * 4
        model.decoder.head.bias[tokenizer.eot_id] = 0.0
        model.decoder.head.bias[tokenizer.stoi["cat"]] = 10.0
        ids, ends = model.generate_ids(x, max_tokens=5)
        assert ids.shape == (4, 6) and (ends == 5).all() and model.generate(x, max_tokens=5) == ["cat cat cat cat cat"] * 4


@pytest.mark.parametrize("kind", ["coca", "simvlm"])
def test_likelihood_logits_are_each_class_prompts_log_likelihood(tokenizer, kind):
    model = _model(tokenizer, kind, dtype=torch.float64)
    classifier = CaptionLikelihoodClassifier(model, CIFAR10_CLASSES).eval()
    x = _images(3, dtype=torch.float64)
    with torch.no_grad():
        logits = classifier(x)
        assert logits.shape == (3, 10)
        for c, prompts in enumerate(class_prompts(CIFAR10_CLASSES, CLASS_ONLY_TEMPLATES)):
            per_prompt = []
            for p in prompts:  # one prompt at a time, every image at once through the plain forward
                ids, eot = model.tokenize([p] * 3)
                per_prompt.append(model.log_likelihood(x, ids, eot))
            assert torch.allclose(logits[:, c], torch.stack(per_prompt).mean(0), atol=1e-10), c
    assert (logits < 0).all()  # log-probabilities
    assert set(classifier.state_dict()) == {f"captioner.{k}" for k in model.state_dict()}
    assert classifier.generate(x) == model.generate(x)
    with pytest.raises(ValueError, match="vocabulary"):
        CaptionLikelihoodClassifier(model, ["zebra"])


def test_likelihood_is_a_probability_over_captions(tokenizer):
    """Σ over every caption "<sot> w <eot>" of p ≤ 1, and p(<sot> w …) sums to 1 over w."""
    model = _model(tokenizer, "simvlm", dtype=torch.float64)
    x = _images(1, dtype=torch.float64)
    words = tokenizer.itos[4:]
    ids = torch.full((len(words), 3), tokenizer.eot_id)
    ids[:, 0], ids[:, 1] = tokenizer.sot_id, torch.arange(4, len(tokenizer))
    with torch.no_grad():
        logits, _, _ = model(x.expand(len(words), -1, -1, -1), ids, torch.full((len(words),), 2))
        first = torch.log_softmax(logits[:, 0], -1)[0]
    assert math.isclose(first.exp().sum().item(), 1.0, rel_tol=1e-9)
    ll = model.log_likelihood(x.expand(len(words), -1, -1, -1), ids, torch.full((len(words),), 2))
    assert ll.exp().sum().item() <= 1.0


def test_likelihood_classifier_is_a_target_for_the_engine(tokenizer):
    from uap import craft

    classifier = CaptionLikelihoodClassifier(_model(tokenizer, "coca"), CIFAR10_CLASSES).eval()
    x = _images(8)
    result = craft(classifier, x, method="sgd", eps=8 / 255, max_passes=1, batch_size=4)
    v = result.v
    assert v.shape == (3, 32, 32) and v.abs().amax() <= 8 / 255 + 1e-6
    assert v.abs().amax() > 0
    x_req = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(classifier(x_req)[:, 3].sum(), x_req)
    assert torch.isfinite(g).all() and g.abs().amax() > 0


def test_coca_zero_shot_weights_are_the_explicit_prompt_ensemble(tokenizer):
    model = _model(tokenizer, "coca")
    clf = coca_zero_shot_classifier(model, CIFAR10_CLASSES)
    x = _images(4)
    with torch.no_grad():
        for c, prompts in enumerate(class_prompts(CIFAR10_CLASSES, HELD_OUT_TEMPLATES)):
            acc = torch.zeros(16)
            for p in prompts:
                e = model.encode_text([p])[0]
                acc += e / e.norm()
            mean = acc / len(prompts)
            assert torch.allclose(clf.class_weights[c], mean / mean.norm(), atol=1e-5)
        img = F.normalize(model.encode_image(x), dim=-1)
        assert torch.allclose(clf(x), model.logit_scale * img @ clf.class_weights.T, atol=1e-5)
        assert torch.allclose(clf.encoder(x), img, atol=1e-6)
    assert set(clf.state_dict()) == {f"captioner.{k}" for k in model.state_dict()} | {"class_weights"}
    with pytest.raises(ValueError, match="no contrastive head"):
        coca_zero_shot_classifier(_model(tokenizer, "simvlm"), CIFAR10_CLASSES)


@pytest.mark.parametrize("kind", ["coca", "simvlm"])
def test_caption_attack_loss_has_a_gradient_and_ascending_it_changes_captions(tokenizer, kind):
    model = _model(tokenizer, kind, seed=1)
    for p in model.parameters():
        p.requires_grad_(False)
    x = _images(6, seed=2) * 0.6 + 0.2
    clean = model.generate_ids(x, max_tokens=6)
    before = model.generate(x, max_tokens=6)
    v = torch.zeros(1, 3, 32, 32, requires_grad=True)
    start = caption_attack_loss(model, x, v, clean)
    (g,) = torch.autograd.grad(start, v)
    assert torch.isfinite(g).all() and g.abs().amax() > 0
    eps, step = 0.3, 0.03
    for _ in range(20):  # signed gradient ascent within an ℓ∞ ball: a universal perturbation
        (g,) = torch.autograd.grad(caption_attack_loss(model, x, v, clean), v)
        with torch.no_grad():
            v += step * g.sign()
            v.clamp_(-eps, eps)
    with torch.no_grad():
        end = caption_attack_loss(model, x, v, clean)
        after = model.generate((x + v).clamp(0, 1), max_tokens=6)
    assert end > start
    assert sum(a != b for a, b in zip(before, after)) >= 1, (before, after)
    with pytest.raises(ValueError, match="clean captions"):
        caption_attack_loss(model, x[:2], v, clean)
    with torch.no_grad():  # a zoo entry (the likelihood classifier) stands for its captioner
        wrapped = caption_attack_loss(CaptionLikelihoodClassifier(model, CIFAR10_CLASSES), x, v, clean)
        assert wrapped.item() == end.item()
    with pytest.raises(ValueError, match="needs a Captioner"):
        caption_attack_loss(torch.nn.Linear(2, 2), x, v, clean)
