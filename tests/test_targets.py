"""uap.targets.resolve_model: user factories, safe weight loading, normalisation wrapper."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from uap.targets import Normalized, load_state_dict_file, resolve_model


def tiny_linear() -> nn.Module:
    """Factory used by the tests below through ``tests.test_targets:tiny_linear``."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))


def test_factory_with_safetensors_weights_and_normalisation(tmp_path):
    reference = tiny_linear()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(1.0)
    save_file(reference.state_dict(), str(tmp_path / "w.safetensors"))
    model, model_id = resolve_model("tests.test_targets:tiny_linear", weights=tmp_path / "w.safetensors",
                                    mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    assert model_id == "tests.test_targets:tiny_linear"
    assert isinstance(model, Normalized) and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    x = torch.rand(2, 3, 4, 4)
    assert torch.allclose(model(x), reference((x - 0.5) / 0.25), atol=1e-6)


def test_torch_state_dict_is_read_weights_only(tmp_path):
    reference = tiny_linear()
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    state = load_state_dict_file(tmp_path / "w.pt")
    assert set(state) == set(reference.state_dict())

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_state_dict_file(tmp_path / "evil.pt")


@pytest.mark.parametrize("spec,kwargs,match", [
    ("no_such_module_xyz:f", {}, "cannot import"),
    ("tests.test_targets:missing", {}, "no attribute"),
    ("tests.test_targets:REPO_CONSTANT", {}, "nn.Module"),
    ("tests.test_targets:tiny_linear", {"mean": [0.5]}, "both --mean and --std"),
    ("", {}, "empty"),
])
def test_bad_specs(spec, kwargs, match):
    with pytest.raises(ValueError, match=match):
        resolve_model(spec, **kwargs)


def test_weights_that_do_not_fit(tmp_path):
    save_file({"bogus": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="do not fit"):
        resolve_model("tests.test_targets:tiny_linear", weights=tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError):
        resolve_model("tests.test_targets:tiny_linear", weights=tmp_path / "nope.safetensors")


REPO_CONSTANT = 3
