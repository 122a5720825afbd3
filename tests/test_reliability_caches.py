"""Caches and checkpoints that must not give silently wrong results: clean predictions keyed by
content, decoded images keyed beyond size + mtime, zoo weights never loaded unverified."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import models
from models import zoo
from tests.tiny_models import tiny_cnn
from uap import data
from uap.fingerprint import tensor_fingerprint
from uap.metrics import CleanPredictions, predict


@pytest.fixture
def model_and_images():
    x = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return tiny_cnn().eval(), x


def _edits():
    """Ways to change images in place: a torch op (bumps the version counter), ``.data`` and a
    NumPy view (neither does)."""
    def torch_op(x):
        x[:20].mul_(0.0)

    def through_data(x):
        x.data[:20] = 0.0

    def through_numpy(x):
        x.numpy()[:20] = 0.0

    return [torch_op, through_data, through_numpy]


@pytest.mark.parametrize("edit", _edits(), ids=lambda f: f.__name__)
def test_an_in_place_edit_of_the_images_invalidates_clean_predictions(model_and_images, edit):
    model, x = model_and_images
    cache = CleanPredictions()
    before = cache.get(model, x)
    version = x._version
    edit(x)
    if edit.__name__ != "torch_op":
        assert x._version == version  # what the old identity + version key could not see
    after = cache.get(model, x)
    assert cache.misses == 2 and cache.hits == 0
    assert torch.equal(after, predict(model, x)) and not torch.equal(after, before)


def test_equal_content_is_a_hit_and_the_cache_cannot_be_edited(model_and_images):
    model, x = model_and_images
    cache = CleanPredictions()
    labels = cache.get(model, x)
    labels[:] = -1  # the caller's copy
    again = cache.get(model, x.clone())  # another tensor, the same images
    assert cache.hits == 1 and torch.equal(again, predict(model, x))


def test_a_retrained_model_misses(model_and_images):
    model, x = model_and_images
    cache = CleanPredictions()
    cache.get(model, x)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    cache.get(model, x)
    assert cache.misses == 2


def test_fingerprint_reads_bytes_shape_and_dtype():
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert tensor_fingerprint(x) == tensor_fingerprint(x.clone())
    assert tensor_fingerprint(x) != tensor_fingerprint(x.reshape(4, 3))
    assert tensor_fingerprint(x) != tensor_fingerprint(x.double())
    assert tensor_fingerprint(x.t()) == tensor_fingerprint(x.t().contiguous())  # a view hashes as its values
    y = x.clone()
    y.view(torch.int32)[0, 0] ^= 1  # one bit
    assert tensor_fingerprint(y) != tensor_fingerprint(x)


def _image_folder(tmp_path, monkeypatch, suffix: str, seed: int):
    """Two classes of two random 8×8 images under ``tmp_path/imgs/train``, with a fresh cache dir."""
    from PIL import Image

    monkeypatch.setenv("UAP_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "imgs"
    rng = np.random.default_rng(seed)
    for cls in ("a", "b"):
        (folder / "train" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / "train" / cls / f"{i}{suffix}")
    return folder, rng


def test_decoded_image_cache_sees_a_same_size_edit_with_the_mtime_put_back(tmp_path, monkeypatch):
    from PIL import Image

    folder, rng = _image_folder(tmp_path, monkeypatch, ".bmp", seed=0)
    first = data.load_split(f"imagefolder:{folder}", "train")
    target = folder / "train" / "a" / "0.bmp"
    st = target.stat()
    edited = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(edited).save(target)  # BMP: the same size in bytes
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # the old modification time back
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    second = data.load_split(f"imagefolder:{folder}", "train")
    row = second.ids.index("train/a/0.bmp")
    assert np.array_equal((second.x[row].permute(1, 2, 0) * 255).round().byte().numpy(), edited)
    assert not torch.equal(first.x, second.x)


def test_a_damaged_decoded_image_cache_is_rebuilt(tmp_path, monkeypatch):
    folder, _ = _image_folder(tmp_path, monkeypatch, ".png", seed=1)
    first = data.load_split(f"imagefolder:{folder}", "train")
    caches = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert caches
    for damage in (b"", b"not an array", b"\x93NUMPY" + bytes(40)):
        for p in caches:
            p.write_bytes(damage)
        again = data.load_split(f"imagefolder:{folder}", "train")
        assert torch.equal(again.x, first.x)


def _entry(tmp_path):
    card = {"builder": "probed", "method": "supervised",
            "architecture": {"backbone": "resnet18", "width": 4, "num_classes": 10}}
    torch.manual_seed(0)
    return zoo.save_entry("tiny", zoo.get_zoo_builder("probed").rebuild(card).eval(), card, zoo_dir=tmp_path)


@pytest.mark.parametrize("sha", [None, "", "not-a-digest"])
def test_a_card_without_sha256_is_refused_even_for_corrupt_weights(tmp_path, sha):
    _entry(tmp_path)
    weights = tmp_path / "tiny.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-8:] = b"\x00" * 8  # a corrupted copy: the last weights changed
    weights.write_bytes(bytes(blob))
    card_path = tmp_path / "tiny.json"
    card = json.loads(card_path.read_text())
    card.pop("sha256")
    if sha is not None:
        card["sha256"] = sha
    card_path.write_text(json.dumps(card))
    with pytest.raises(ValueError, match="no valid sha256.*cannot be verified") as e:
        models.load("tiny", zoo_dir=tmp_path)
    assert "\n" not in str(e.value)
    assert models.load("tiny", zoo_dir=tmp_path, verify=False) is not None  # only when asked for explicitly


def test_a_card_with_the_right_sha256_still_loads(tmp_path):
    card = _entry(tmp_path)
    assert len(card["sha256"]) == 64
    assert models.load("tiny", zoo_dir=tmp_path)(torch.rand(2, 3, 32, 32)).shape == (2, 10)
