"""Text side of CLIP: tokenizer, generated captions, causal text transformer."""
from __future__ import annotations

import pytest
import torch

from models.captions import (COLOURS, HELD_OUT_TEMPLATES, LIGHTS, TRAIN_TEMPLATES, all_training_captions,
                             class_prompts, colour_names, image_attributes, make_captions, with_articles)
from models.text_transformer import TextTransformer
from models.tokenizer import WordTokenizer, mask_words, split_words
from uap.data import CIFAR10_CLASSES

# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_layout():
    tok = WordTokenizer.build(["a photo of a red cat.", "a dog, mostly blue."], context_length=10)
    ids, eot = tok.encode(["a red dog.", "a cat, mostly blue."])
    assert ids.shape == (2, 10) and ids.dtype == torch.int64
    assert ids[:, 0].tolist() == [tok.sot_id] * 2
    assert eot.tolist() == [5, 7]
    assert ids[0, 5] == tok.eot_id and (ids[0, 6:] == tok.pad_id).all()
    assert tok.decode(ids[1]) == "a cat , mostly blue ."
    again = WordTokenizer.from_json(tok.to_json())
    assert torch.equal(again.encode(["a red dog."])[0], ids[:1])


def test_unknown_words_become_unk_and_long_captions_raise():
    tok = WordTokenizer.build(["a cat."], context_length=5)
    ids, _ = tok.encode(["a blurry cat"])
    assert ids[0, 2] == tok.unk_id
    assert tok.unknown_words(["a blurry cat"]) == ["blurry"]
    with pytest.raises(ValueError, match="context_length"):
        tok.encode(["a cat a cat a cat"])
    ids, eot = tok.encode(["a cat a cat a cat"], truncate=True)
    assert eot.item() == 4 and ids[0, 4] == tok.eot_id


def test_word_dropout_keeps_specials_and_protected_tokens():
    tok = WordTokenizer.build(["a photo of a red cat."], context_length=12)
    ids, eot = tok.encode(["a photo of a red cat."] * 200)
    cat = tok.stoi["cat"]
    out = mask_words(ids, eot, 0.5, keep=ids == cat, generator=torch.Generator().manual_seed(0))
    changed = out != ids
    assert (out[changed] == tok.unk_id).all()
    assert not changed[:, 0].any() and not changed[ids == tok.eot_id].any() and not changed[ids == tok.pad_id].any()
    assert not changed[ids == cat].any()
    frac = changed.sum().item() / (200 * 6)  # 6 droppable words per caption (5 words + '.')
    assert 0.4 < frac < 0.6


def test_split_words_lowercases_and_separates_punctuation():
    assert split_words("A Close-up photo, of the CAT.") == ["a", "close-up", "photo", ",", "of", "the", "cat", "."]


# --------------------------------------------------------------------------- captions


def _solid(rgb: tuple[float, float, float]) -> torch.Tensor:
    return torch.tensor(rgb).view(1, 3, 1, 1).expand(1, 3, 32, 32).clone()


@pytest.mark.parametrize("rgb,name", [((0.9, 0.1, 0.1), "red"), ((0.1, 0.2, 0.9), "blue"), ((0.1, 0.8, 0.2), "green"),
                                      ((0.95, 0.9, 0.1), "yellow"), ((0.05, 0.05, 0.05), "black"),
                                      ((0.95, 0.95, 0.95), "white"), ((0.5, 0.5, 0.5), "gray"),
                                      ((0.45, 0.25, 0.1), "brown"), ((0.95, 0.5, 0.05), "orange")])
def test_colour_names_of_solid_pixels(rgb, name):
    assert COLOURS[colour_names(torch.tensor([rgb])).item()] == name


def test_attributes_read_the_object_the_background_and_the_light():
    x = _solid((0.1, 0.2, 0.9))  # blue background …
    x[:, :, 8:24, 8:24] = torch.tensor([0.9, 0.1, 0.1]).view(1, 3, 1, 1)  # … red object in the centre
    dark = _solid((0.1, 0.1, 0.1))
    bright = _solid((0.95, 0.95, 0.95))
    a = image_attributes(torch.cat([x, dark, bright]))
    assert COLOURS[a.colour[0]] == "red" and COLOURS[a.background[0]] == "blue"
    assert [LIGHTS[i] for i in a.light.tolist()][1:] == ["dark", "bright"]
    with pytest.raises(ValueError):
        image_attributes(torch.rand(2, 1, 32, 32))


def test_captions_vary_with_the_image_and_are_seeded():
    x = torch.cat([_solid((0.9, 0.1, 0.1)), _solid((0.1, 0.2, 0.9))])
    a = image_attributes(x)
    y = torch.tensor([3, 3])
    same_template = torch.tensor([0, 0])
    caps = make_captions(a, y, CIFAR10_CLASSES, TRAIN_TEMPLATES, template_index=same_template)
    assert caps == ["a photo of a red cat.", "a photo of a blue cat."]
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert make_captions(a, y, CIFAR10_CLASSES, generator=g1) == make_captions(a, y, CIFAR10_CLASSES, generator=g2)


def test_articles_are_fixed():
    assert with_articles("a orange airplane on a blue background.") == "an orange airplane on a blue background."
    assert with_articles("a photo of a cat.") == "a photo of a cat."


def test_held_out_prompts_never_occur_in_training():
    train = set(all_training_captions(CIFAR10_CLASSES))
    held = {p for per_class in class_prompts(CIFAR10_CLASSES) for p in per_class}
    assert len(held) == len(HELD_OUT_TEMPLATES) * 10
    assert not held & train
    assert all(len(split_words(c)) <= 14 for c in train)  # fits the default context of 16
    with pytest.raises(ValueError, match="field"):
        class_prompts(CIFAR10_CLASSES, ["a {colour} {c}."])


# --------------------------------------------------------------------------- text transformer


def test_causal_mask_later_tokens_do_not_change_earlier_features():
    torch.manual_seed(0)
    model = TextTransformer(vocab_size=40, context_length=12, width=32, layers=2, heads=4).eval()
    ids = torch.randint(4, 40, (3, 12))
    for k in (3, 7, 11):
        changed = ids.clone()
        changed[:, k] = (changed[:, k] + 1 - 4) % 36 + 4
        with torch.no_grad():
            a, b = model.token_features(ids), model.token_features(changed)
        assert torch.equal(a[:, :k], b[:, :k])  # bit-identical before k
        assert (a[:, k:] - b[:, k:]).abs().amax() > 1e-4  # and really different from k on


def test_sentence_feature_ignores_padding_after_eot():
    torch.manual_seed(1)
    model = TextTransformer(vocab_size=20, context_length=10, width=16, layers=1, heads=2).eval()
    ids = torch.randint(4, 20, (2, 10))
    eot = torch.tensor([4, 6])
    other = ids.clone()
    other[0, 5:] = 0
    other[1, 7:] = 7
    with torch.no_grad():
        assert torch.allclose(model(ids, eot), model(other, eot), atol=1e-6)
        assert torch.allclose(model(ids, eot), model(ids[:, :7], eot), atol=1e-6)
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros(1, 11, dtype=torch.long), torch.tensor([3]))
