"""The zoo: entries round-trip, bad names are refused, shipped checkpoints match their cards."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import models
from models import zoo
from models.probes import ProbedClassifier


def _entry(tmp_path, name="tiny"):
    card = {"builder": "probed", "method": "supervised",
            "architecture": {"backbone": "resnet18", "width": 4, "num_classes": 10}}
    torch.manual_seed(0)
    model = zoo.get_zoo_builder("probed").rebuild(card).eval()
    return model, zoo.save_entry(name, model, card, zoo_dir=tmp_path)


def test_save_and_load_roundtrip(tmp_path):
    model, card = _entry(tmp_path)
    assert zoo.available(tmp_path) == ["tiny"]
    assert card["sha256"] == zoo.sha256_file(tmp_path / "tiny.safetensors") and card["size_bytes"] > 0
    loaded = models.load("tiny", zoo_dir=tmp_path)
    assert not loaded.training and isinstance(loaded, ProbedClassifier) and hasattr(loaded, "encoder")
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert models.load(str(tmp_path / "tiny.json"))(x).shape == (3, 10)  # by path too
    assert json.loads((tmp_path / "tiny.json").read_text())["name"] == "tiny"


def test_unknown_name_lists_the_zoo(tmp_path):
    _entry(tmp_path)
    with pytest.raises(ValueError, match="tiny"):
        models.load("no-such-model", zoo_dir=tmp_path)


def test_corrupt_weights_are_refused(tmp_path):
    _entry(tmp_path)
    path = tmp_path / "tiny.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        models.load("tiny", zoo_dir=tmp_path)


def test_a_new_builder_is_one_registration(tmp_path, monkeypatch):
    zoo.zoo_builders()  # the built-in builders are registered first
    monkeypatch.setattr(zoo, "_BUILDERS", dict(zoo._BUILDERS))  # the registrations below end with the test

    @zoo.register_zoo_builder("test-tiny")
    def build_tiny(card):  # a function: a builder that rebuilds entries written with save_entry
        enc = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, card["dim"]))
        return ProbedClassifier(enc, nn.Linear(card["dim"], 2))

    model = build_tiny({"dim": 5})
    zoo.save_entry("custom", model, {"builder": "test-tiny", "dim": 5}, zoo_dir=tmp_path)
    assert models.load("custom", zoo_dir=tmp_path)(torch.rand(2, 3, 4, 4)).shape == (2, 2)
    with pytest.raises(ValueError, match="only rebuilds entries"):
        zoo.get_zoo_builder("test-tiny").build(None, None, None, print, 1)
    zoo.save_entry("orphan", model, {"builder": "nobody", "dim": 5}, zoo_dir=tmp_path)
    with pytest.raises(ValueError, match=r"orphan.json: no zoo builder 'nobody' is registered \(known: clip, coca, probed, simvlm"):
        models.load("orphan", zoo_dir=tmp_path)
    assert set(zoo.zoo_builders()) >= {"probed", "clip", "test-tiny"}


def test_every_shipped_card_names_a_registered_builder():
    """The zoo's cards rebuild through the registry: each names a builder that rebuilds its architecture."""
    for name, card in zoo.cards().items():
        module = zoo.get_zoo_builder(card["builder"]).rebuild(card)
        assert isinstance(module, nn.Module) and hasattr(module, "encoder"), name


SHIPPED = [n for n, c in zoo.cards().items() if c.get("builder") == "probed"]


@pytest.mark.parametrize("name", SHIPPED or [pytest.param("none", marks=pytest.mark.skip("zoo is empty"))])
def test_zoo_checkpoint_reproduces_its_card(name, data_root):
    from uap.data import load

    x, y, _ = load("cifar10", "test", n=1000, seed=0)
    model = models.load(name)
    card = models.load_card(name)
    assert model.encoder is not None and card["sha256"]
    with torch.no_grad():
        acc = torch.cat([model(x[i:i + 500]) for i in range(0, 1000, 500)]).argmax(1).eq(y).float().mean().item()
    assert abs(acc - card["linear_probe_acc"]) <= 0.03, f"{name}: {acc:.4f} vs card {card['linear_probe_acc']:.4f}"
    if card["method"] in ("supervised", "airbench") and not card["backbone"].startswith("vit"):
        assert card["linear_probe_acc"] >= 0.85
    else:  # what an SSL encoder (or a ViT trained on CIFAR-10 at this budget) must reach to be a useful target
        assert card["linear_probe_acc"] >= 0.60
        assert card["linear_probe_acc"] >= card["random_init_linear_probe_acc"] + 0.20


def test_knn_head_shares_the_encoder_and_classifies(data_root, monkeypatch):
    import models.zoo as zoo
    from uap import data

    if "supervised" not in zoo.available():
        pytest.skip("no supervised zoo entry")
    monkeypatch.setattr(zoo, "KNN_BANK_SIZE", 1000)
    knn = zoo.load("supervised@knn")
    probed = zoo.load("supervised")
    x, y, _ = data.load("cifar10", "test", n=200, seed=1)
    with torch.no_grad():
        assert torch.allclose(knn.encoder(x), probed.encoder(x), atol=1e-5)  # same encoder, another head
        logits = knn(x)
    assert logits.shape == (200, 10) and torch.isfinite(logits).all()
    assert (logits.argmax(1) == y).float().mean() > 0.6  # far above chance (0.1)
    assert "kNN" in knn.card["head"]


TRAINED = {n: c for n, c in zoo.cards().items() if "method_hparams" in c.get("hyperparameters", {})}


@pytest.mark.parametrize("name", sorted(TRAINED) or [pytest.param("none", marks=pytest.mark.skip("zoo is empty"))])
def test_shipped_cards_rebuild_their_method_with_the_recorded_hyperparameters(name):
    """A card's run configuration still resolves and builds its method, whose hyper-parameters
    (defaults filled in by the method's Options) are those the card recorded, in the same order
    (hyper-parameters added since then keep their defaults)."""
    from models.train import TrainConfig, build_method

    recorded = TRAINED[name]["hyperparameters"]
    config = TrainConfig(**{k: v for k, v in recorded.items() if k not in ("method_hparams", "lr_effective")})
    hparams = build_method(config.resolved()).hparams
    assert {k: hparams[k] for k in recorded["method_hparams"]} == recorded["method_hparams"]
    assert [k for k in hparams if k in recorded["method_hparams"]] == list(recorded["method_hparams"])
