"""gd-uap: a plain loop gives the same v update for update (every prior, ℓ∞ and ℓ2), the
known most activating direction of one convolution is found, crafting without images from the
library and the command line, exact resume, and two ranks give the one-process v."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

import uap
from cli import app
from uap.projection import project_lp
from uap.universal import visiting_order

SHAPE = (3, 8, 8)


class TwoConv(nn.Module):
    """Two convolutions and a linear head on 3×8×8 images (no batch norm: nothing to fold)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.head = nn.Linear(6 * 4 * 4, 5)
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.c2(F.relu(self.c1(x - 0.5)))).flatten(1))


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _reference(model: TwoConv, x: torch.Tensor, *, prior: str, eps: float, p: float, passes: int, steps: int,
               batch_size: int, step_size: float = 0.1, decay: float = 0.7, seed: int = 0) -> torch.Tensor:
    """GD-UAP written out: both activations computed by hand, the log of their ℓ2 norms summed
    per image and averaged, a signed (ℓ∞) or normalised (ℓ2) step, the exact projection."""

    def objective(images: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        z = (images + v).clamp(0, 1)
        a1 = F.conv2d(z - 0.5, model.c1.weight, model.c1.bias, padding=1)
        a2 = F.conv2d(F.relu(a1), model.c2.weight, model.c2.bias, stride=2, padding=1)
        per_image = sum(0.5 * torch.log((a ** 2).flatten(1).sum(1)) for a in (a1, a2))
        return per_image.mean()

    v = torch.zeros(SHAPE)
    for k in range(1, passes + 1):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + k + 7919)
        alpha = step_size * eps * decay ** (k - 1)
        if prior == "data":
            batches = [x[idx] for idx in visiting_order(len(x), seed, k).split(batch_size)]
        elif prior == "none":
            batches = [torch.full((1, *SHAPE), 0.5) for _ in range(steps)]
        else:
            batches = None
        for i in range(steps if batches is None else len(batches)):
            if batches is None:
                images = (0.5 + 0.25 * torch.randn((batch_size, *SHAPE), generator=generator)).clamp(0, 1)
            else:
                images = batches[i]
            v.requires_grad_(True)
            (g,) = torch.autograd.grad(objective(images, v), v)
            direction = g.sign() if math.isinf(p) else g / g.norm()
            v = project_lp(v.detach() + alpha * direction, eps, p)
    return v


@pytest.mark.parametrize("prior", ["none", "range", "data"])
@pytest.mark.parametrize("norm,eps", [(math.inf, 0.05), (2, 0.6)])
def test_gd_uap_is_the_plain_loop_update_for_update(prior, norm, eps):
    model, x = TwoConv(), _images(13, seed=1)
    options = {"prior": prior, "steps": 4, "batch_size": 5}
    pert = uap.craft(model, x if prior == "data" else None, eps=eps, norm=norm, method="gd-uap", max_passes=3,
                     delta=0.0, method_options=options, heldout=_images(6, seed=2))
    want = _reference(model, x, prior=prior, eps=eps, p=float(norm), passes=3, steps=4, batch_size=5)
    torch.testing.assert_close(pert.v, want, rtol=0, atol=1e-7)
    assert [r["updates"] for r in pert.history] == [3 if prior == "data" else 4] * 3
    assert pert.extra["gd_uap"]["prior"] == prior


def test_gd_uap_finds_the_most_activating_direction_of_one_convolution():
    """One convolution whose kernel covers the image is a linear map W (4 × 192) of the input; its
    filters sum to zero, so the grey canvas adds nothing and the objective is log ‖W v‖₂: on the
    ℓ2 ball the maximiser is ±ε times W's top right singular vector."""
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 8, bias=False)
    with torch.no_grad():
        w = torch.randn(4, 192)
        w[0] *= 3.0  # a clear top singular value
        w -= w.mean(dim=1, keepdim=True)
        conv.weight.copy_(w.reshape(4, 3, 8, 8))
    model = nn.Sequential(conv, nn.Flatten()).eval().requires_grad_(False)
    top = torch.linalg.svd(w, full_matrices=False).Vh[0].reshape(SHAPE)
    eps = 0.5
    # v = 0 is a stationary point here (W·0 = 0): start from a random direction on the sphere
    pert = uap.craft(model, None, eps=eps, norm=2, method="gd-uap", max_passes=1, init="random",
                     method_options={"steps": 300, "step_size": 0.2, "decay": 1.0}, heldout=_images(2, seed=0))
    cosine = torch.dot(pert.v.flatten(), top.flatten()).abs() / pert.v.norm()
    assert cosine > 0.9999 and pert.v.norm().item() == pytest.approx(eps, rel=1e-5)
    assert pert.extra["init"] == "random"


def test_crafting_without_images_runs_every_pass_and_measures_the_heldout_set():
    model, held = TwoConv(), _images(9, seed=2)
    pert = uap.craft(model, None, eps=0.05, method="gd-uap", delta=0.5, max_passes=2, heldout=held,
                     method_options={"steps": 2})
    assert pert.passes == 2 and pert.extra["n_images"] == 0 and pert.data == "no crafting images"
    assert all(r["fooling_rate"] is None and r["heldout_fooling_rate"] is not None for r in pert.history)
    assert uap.runs.craft.stop_reason(pert)["reason"] == "max_passes"


def test_a_method_or_prior_that_needs_images_refuses_to_craft_without_them():
    model, held = TwoConv(), _images(4, seed=2)
    with pytest.raises(ValueError, match=r"method 'gd-uap' with \{'prior': 'data'\} needs crafting images"):
        uap.craft(model, None, eps=0.05, method="gd-uap", method_options={"prior": "data"}, heldout=held)
    with pytest.raises(ValueError, match="method 'sgd' needs crafting images"):
        uap.craft(model, None, eps=0.05, method="sgd", heldout=held)
    with pytest.raises(ValueError, match="needs held-out images to know the image shape"):
        uap.craft(model, None, eps=0.05, method="gd-uap")
    with pytest.raises(ValueError, match="keep_best .* needs x"):
        uap.craft(model, None, eps=0.05, method="gd-uap", keep_best=True, heldout=held)


def test_options_are_checked_and_a_model_without_convolutions_is_refused():
    with pytest.raises(ValueError, match="unknown prior 'uniform'"):
        uap.methods.make_method("gd-uap", {"prior": "uniform"})
    with pytest.raises(ValueError, match="steps must be"):
        uap.methods.make_method("gd-uap", {"steps": 0})
    flat = nn.Sequential(nn.Flatten(), nn.Linear(192, 5))
    with pytest.raises(ValueError, match="convolutional layers; the model has none"):
        uap.craft(flat, None, eps=0.05, method="gd-uap", max_passes=1, heldout=_images(2, seed=0))


@pytest.mark.parametrize("prior", ["range", "data"])
def test_a_resumed_run_is_the_uninterrupted_one(prior):
    model, x, held = TwoConv(), _images(10, seed=1), _images(5, seed=2)
    kw = dict(eps=0.05, method="gd-uap", delta=0.0, heldout=held, method_options={"prior": prior, "steps": 3})
    xs = x if prior == "data" else None
    whole = uap.craft(model, xs, max_passes=3, **kw)
    first = uap.craft(model, xs, max_passes=1, **kw)
    rest = uap.craft(model, xs, max_passes=3, resume=first, **kw)
    assert torch.equal(rest.v, whole.v)
    strip = lambda h: [{k: r[k] for k in r if k != "seconds"} for r in h]  # noqa: E731
    assert strip(rest.history) == strip(whole.history)


def test_the_command_line_crafts_without_images_and_refuses_a_prior_that_needs_them(tmp_path, data_root):
    base = ["craft", "--model", "tests.tiny_models:tiny_cnn", "--method", "gd-uap", "--heldout", "10",
            "--max-passes", "2", "--eps", "8/255", "--data-root", str(data_root)]
    result = CliRunner().invoke(app, [*base, "--method-option", "steps=2", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["n_images"] == 0 and summary["passes"] == 2 and summary["fooling_rate"] is None
    assert summary["heldout_fooling_rate"] is not None and "without crafting images" in summary["stopped"]["text"]
    assert json.loads((tmp_path / "a" / "perturbation.settings.json").read_text())["craft_set_sha256"] is None
    bad = CliRunner().invoke(app, [*base, "--method-option", "prior=data", "--n-images", "0", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and not (tmp_path / "b").exists()
    assert "--n-images: method gd-uap with these options needs crafting images" in bad.output


# ---------------------------------------------------------------------------- two ranks

def _runs() -> dict:
    model, x, held = TwoConv(), _images(14, seed=1), _images(6, seed=2)
    out = {}
    for prior in ("range", "data"):
        pert = uap.craft(model, x if prior == "data" else None, eps=0.05, method="gd-uap", max_passes=2, delta=0.0,
                         heldout=held, method_options={"prior": prior, "steps": 3, "batch_size": 6})
        out[prior] = (pert.v, [r["heldout_fooling_rate"] for r in pert.history])
    return out


def _worker(rank: int, size: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        out = _runs()
        if rank == 0:
            torch.save(out, path)
    finally:
        dist.destroy_process_group()


def test_two_ranks_craft_the_one_process_v(tmp_path):
    from tests.test_distributed import spawn_two_ranks

    two = spawn_two_ranks(_worker, tmp_path)
    torch.set_num_threads(1)
    one = _runs()
    for prior in ("range", "data"):
        assert two[prior][1] == one[prior][1]
        torch.testing.assert_close(two[prior][0], one[prior][0], rtol=0, atol=1e-6)
