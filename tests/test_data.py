"""uap.data: layouts, balanced seeded subsets, disjoint splits, and the offline error."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from uap import data
from uap.data import CIFAR10_CLASSES, DataNotFoundError, balanced_subset


def test_cifar10_shapes_labels_and_class_order(data_root):
    x, y, classes = data.load("cifar10", split="test", root=data_root)
    assert x.shape == (10_000, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (10_000,) and y.dtype == torch.int64
    assert classes == CIFAR10_CLASSES
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert torch.equal(torch.bincount(y), torch.full((10,), 1000))


def test_train_split_size(data_root):
    x, y, _ = data.load("cifar10", split="train", root=data_root)
    assert x.shape == (50_000, 3, 32, 32)
    assert torch.equal(torch.bincount(y), torch.full((10,), 5000))


def test_subsets_are_balanced_and_deterministic(data_root):
    a = data.load_split("cifar10", "train", n=1000, seed=3, root=data_root)
    b = data.load_split("cifar10", "train", n=1000, seed=3, root=data_root)
    c = data.load_split("cifar10", "train", n=1000, seed=4, root=data_root)
    assert torch.equal(torch.bincount(a.y), torch.full((10,), 100))
    assert a.ids == b.ids and torch.equal(a.x, b.x)
    assert a.ids != c.ids
    assert len(set(a.ids)) == 1000  # no image twice


def test_crafting_and_heldout_subsets_never_share_an_image(data_root):
    craft = data.load_split("cifar10", "train", n=2000, seed=0, root=data_root)
    held = data.load_split("cifar10", "test", n=2000, seed=0, root=data_root)
    assert not set(craft.ids) & set(held.ids)
    # Also by content: no crafting image is pixel-identical to a held-out image.
    h_craft = {hash(t.numpy().tobytes()) for t in (craft.x * 255).round().to(torch.uint8)}
    h_held = {hash(t.numpy().tobytes()) for t in (held.x * 255).round().to(torch.uint8)}
    assert not h_craft & h_held


def test_balanced_subset_uneven_n_and_short_classes():
    labels = np.array([0] * 50 + [1] * 3 + [2] * 50)
    idx = balanced_subset(labels, 31, seed=0)
    assert len(idx) == len(set(idx)) == 31
    counts = np.bincount(labels[idx], minlength=3)
    assert counts[1] == 3 and counts.sum() == 31  # the short class gives all it has
    with pytest.raises(ValueError, match="only 103"):
        balanced_subset(labels, 104, seed=0)


def test_missing_data_gives_clear_error(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("UAP_DATA_DIR", str(empty))
    monkeypatch.setenv("UAP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("UAP_NO_DOWNLOAD", raising=False)

    def offline(*args, **kwargs):
        import urllib.error

        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    import torchvision.datasets.utils as tvu

    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    with pytest.raises(DataNotFoundError) as e:
        data.load("cifar10", split="test")
    msg = str(e.value)
    assert "UAP_DATA_DIR" in msg and str(empty) in msg and "offline" in msg
    assert "urllib" not in msg


def test_imagefolder_without_splits_is_divided_disjointly(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("UAP_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    tr = data.load_split(f"imagefolder:{tmp_path / 'imgs'}", "train")
    te = data.load_split(f"imagefolder:{tmp_path / 'imgs'}", "test")
    assert tr.classes == te.classes == ("cats", "dogs")
    assert len(tr.ids) + len(te.ids) == 40 and not set(tr.ids) & set(te.ids)
    assert tr.x.shape[1:] == (3, 8, 8)
    # PNG is lossless: the loaded pixels are the saved ones
    first = np.asarray(Image.open(tmp_path / "imgs" / tr.ids[0]))
    assert np.array_equal((tr.x[0].permute(1, 2, 0) * 255).round().byte().numpy(), first)


def test_torchvision_batches_layout_read_without_unsafe_unpickling(tmp_path, monkeypatch):
    monkeypatch.setenv("UAP_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        batch = {b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    x, y, classes = data.load("cifar10", "train", root=tmp_path)
    assert x.shape == (20, 3, 32, 32) and classes == CIFAR10_CLASSES
    assert y.tolist() == [0, 1, 2, 3] * 5

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data.load("cifar10", "test", root=tmp_path)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        data.load("cifar10", split="val")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("mnist")
    with pytest.raises(ValueError, match="positive"):
        data.load("cifar10", n=0)


def _tiny_folder(root, n: int = 40):
    """``root/<a|b>/<i>.png``: 8×8 images in two classes, in one folder (the crc32 split rule)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "ab"[i % 2] / f"{i}.png")
    return root


def test_more_images_than_the_split_has_takes_them_all_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("UAP_CACHE_DIR", str(tmp_path / "cache"))
    name = f"imagefolder:{_tiny_folder(tmp_path / 'images')}"
    whole = data.load_split(name, "test", n=None)
    with pytest.warns(UserWarning, match=f"asked for 2000 images of {name}'s test split, which has {len(whole.y)}: "
                                         f"taking all {len(whole.y)}"):
        many = data.load_split(name, "test", n=2000, seed=1)
    exact = data.load_split(name, "test", n=len(whole.y), seed=1)
    assert many.ids == exact.ids and torch.equal(many.x, exact.x) and sorted(many.ids) == sorted(whole.ids)


def test_the_command_line_says_so_in_one_warning_line(tmp_path):
    from typer.testing import CliRunner

    import cli

    folder = _tiny_folder(tmp_path / "images")
    result = CliRunner().invoke(cli.app, [
        "craft", "--model", "tests.tiny_models:tiny_mlp", "--data", f"imagefolder:{folder}", "--n-images", "50",
        "--heldout", "2000", "--max-passes", "1", "--method", "sgd", "--out", str(tmp_path / "run")],
        env={"UAP_CACHE_DIR": str(tmp_path / "cache")})
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "asked for" in line]
    assert [line.split(" split, ")[0].rsplit("'s ", 1)[1] for line in lines] == ["train", "test"], result.output
    assert all(line.startswith("warning: asked for ") and ": taking all " in line for line in lines), result.output
