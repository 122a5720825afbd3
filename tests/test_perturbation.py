"""Perturbation: safetensors + JSON round trip (no pickle), PNG rendering, validation."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from uap import Perturbation


def _pert() -> Perturbation:
    v = (torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.01).clamp(-8 / 255, 8 / 255)
    history = [{"pass": 1, "fooling_rate": 0.5, "heldout_fooling_rate": None, "seconds": 1.5}]
    return Perturbation(v=v, model="m", data="cifar10:train:n=8", eps=8 / 255, norm=math.inf, delta=0.2,
                        method="deepfool", seed=3, history=history, seconds=1.5, extra={"n_images": 8})


def test_round_trip(tmp_path):
    p = _pert()
    path = p.save(tmp_path / "pert")
    assert path.name == "pert.safetensors" and (tmp_path / "pert.json").is_file()
    q = Perturbation.load(path)
    assert torch.equal(q.v, p.v)
    assert q.metadata() == p.metadata()
    assert q.norm == "inf" and q.p == math.inf and q.fooling_rate == 0.5 and q.passes == 1
    meta = json.loads((tmp_path / "pert.json").read_text())  # plain JSON, no Infinity
    assert meta["norm"] == "inf" and meta["shape"] == [3, 8, 8] and meta["version"]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["pert.json", "pert.safetensors"]  # no temp files left


def test_tensor_file_alone_is_self_describing(tmp_path):
    p = _pert()
    path = p.save(tmp_path / "pert.safetensors")
    (tmp_path / "pert.json").unlink()
    q = Perturbation.load(path)
    assert q.method == "deepfool" and q.history == p.history and q.extra == p.extra


def test_file_is_safetensors_not_pickle(tmp_path):
    path = _pert().save(tmp_path / "pert.safetensors")
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    assert header["v"]["dtype"] == "F32" and header["v"]["shape"] == [3, 8, 8]
    assert not raw.startswith(b"\x80")  # a pickle stream would start with PROTO


def test_png_scaled_to_full_range(tmp_path):
    p = _pert()
    path = p.to_png(tmp_path / "v.png", scale=4)
    img = np.asarray(Image.open(path))
    assert img.shape == (32, 32, 3)
    assert img.min() == 0 and img.max() == 255  # min-max scaled for visibility (paper Fig. 4)
    argmax = np.unravel_index(p.v.permute(1, 2, 0).numpy().argmax(), (8, 8, 3))
    assert img[argmax[0] * 4, argmax[1] * 4, argmax[2]] == 255


def test_zero_perturbation_png_is_grey(tmp_path):
    path = Perturbation(v=torch.zeros(3, 4, 4)).to_png(tmp_path / "z.png", scale=1)
    assert set(np.unique(np.asarray(Image.open(path)))) == {128}


def test_validation(tmp_path):
    with pytest.raises(ValueError, match="C×H×W"):
        Perturbation(v=torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="norm"):
        Perturbation(v=torch.zeros(3, 4, 4), norm="7")
    with pytest.raises(FileNotFoundError):
        Perturbation.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError):
        Perturbation.load(tmp_path / "junk.safetensors")
