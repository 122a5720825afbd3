"""deepfool: closed form on affine classifiers, Foolbox agreement on a trained CNN, batching."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.tiny_models import Affine, trained_tiny_cnn
from uap.deepfool import (
    REPLICATE_MAX_ELEMENTS,
    _auto_gradients,
    _candidate_grads,
    _replicated_grads,
    deepfool,
)
from uap.forward import BatchLayout

OVERSHOOT = 0.02


class Lookahead:
    """A lookahead as Algorithm 1 passes one: ``images(r)`` to classify, ``logits`` filled in."""

    def __init__(self, images):
        self.images, self.logits = images, None


def _affine_problem(margins: list[float], n: int = 6, seed: int = 0):
    """An affine 5-class model on 3×8×8 images near 0.5 with the given logit gaps at each x0."""
    g = torch.Generator().manual_seed(seed)
    d, c = 3 * 8 * 8, len(margins)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    x0 = 0.5 + 0.05 * (torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64) - 0.5)
    # Bias chosen so that f(x0[0]) = margins; other images get nearby logits.
    b = torch.tensor(margins, dtype=torch.float64) - w @ x0[0].flatten()
    return Affine(w, b), x0


def _closed_form(model: Affine, x0: torch.Tensor, p: float) -> torch.Tensor:
    """Minimal ℓp perturbation to the nearest affine boundary: min_k |f_k−f_0| / ‖w_k−w_0‖_q."""
    out = []
    for x in x0:
        f = model(x[None])[0]
        k0 = int(f.argmax())
        best = None
        for k in range(f.numel()):
            if k == k0:
                continue
            dw = model.weight[k] - model.weight[k0]
            q = 1.0 if math.isinf(p) else 2.0
            dist = (f[k0] - f[k]).abs() / torch.linalg.vector_norm(dw, ord=q)
            if best is None or dist < best[0]:
                best = (dist, dw)
        dist, dw = best
        r = dist * dw.sign() if math.isinf(p) else dist * dw / dw.norm()
        out.append(r.view_as(x))
    return torch.stack(out)


@pytest.mark.parametrize("p,margins", [(2.0, [0.0, -15.0, -18.0, -20.0, -25.0]),
                                       (math.inf, [0.0, -40.0, -45.0, -50.0, -60.0])])
def test_affine_matches_closed_form(p, margins):
    model, x0 = _affine_problem(margins)
    r, success = deepfool(model, x0, norm=p, candidates=5, overshoot=OVERSHOOT)
    expected = _closed_form(model, x0, p)
    assert bool(success.all())
    # The comparison is only meaningful if no pixel was clipped at the [0, 1] box.
    assert bool(((x0 + r) > 0).all() and ((x0 + r) < 1).all())
    got = r / (1 + OVERSHOOT)
    rel = (got - expected).flatten(1).norm(dim=1) / expected.flatten(1).norm(dim=1)
    assert rel.max().item() < 1e-4, rel


def test_affine_candidates_restrict_the_search():
    # With 2 candidates only the runner-up class is considered, even if another boundary is nearer.
    model, x0 = _affine_problem([0.0, -5.0, -5.5, -60.0, -70.0], n=1)
    r_all, _ = deepfool(model, x0, candidates=5)
    r_two, _ = deepfool(model, x0, candidates=2)
    f = model(x0)
    runner_up = int(f.topk(2).indices[0, 1])
    dw = model.weight[runner_up] - model.weight[0]
    expected = (f[0, 0] - f[0, runner_up]).abs() / dw.norm() * dw / dw.norm()
    torch.testing.assert_close((r_two / (1 + 0.02)).flatten(), expected, rtol=1e-4, atol=1e-7)
    assert r_all.norm() <= r_two.norm() + 1e-12


@pytest.fixture(scope="module")
def cnn(data_root):
    return trained_tiny_cnn()


@pytest.fixture(scope="module")
def test_images(data_root):
    from uap import data

    x, _, _ = data.load("cifar10", split="test", n=64, seed=0)
    return x


def test_cnn_fooled_and_close_to_foolbox(cnn, test_images):
    import foolbox as fb

    x = test_images
    r, success = deepfool(cnn, x, norm=2, candidates=10, overshoot=0.02, max_iter=50)
    assert success.float().mean().item() >= 0.99
    clean = cnn(x).argmax(1)
    adv = (x + r).clamp(0, 1)
    assert torch.equal(cnn(adv).argmax(1) != clean, success)  # success flags are honest
    ours = (adv - x).flatten(1).norm(dim=1)[success].median()

    attack = fb.attacks.L2DeepFoolAttack(steps=50, candidates=10, overshoot=0.02, loss="logits")
    _, fb_adv, fb_success = attack(fb.PyTorchModel(cnn, bounds=(0, 1)), x, fb.criteria.Misclassification(clean),
                                   epsilons=None)
    theirs = (fb_adv - x).flatten(1).norm(dim=1)[fb_success].median()
    assert abs(ours - theirs) / theirs < 0.10, (ours, theirs)


def test_linf_cnn_fooled_with_small_linf(cnn, test_images):
    r, success = deepfool(cnn, test_images, norm="inf")
    assert success.float().mean().item() >= 0.99
    r2, _ = deepfool(cnn, test_images, norm=2)
    # The ℓ∞ geometry finds smaller ℓ∞ perturbations than the ℓ2 one (median over images).
    assert r.flatten(1).abs().amax(1).median() < r2.flatten(1).abs().amax(1).median()


def test_batched_equals_one_image_at_a_time(cnn, test_images):
    x = test_images[:6]
    r, s = deepfool(cnn, x)
    for i in range(len(x)):
        ri, si = deepfool(cnn, x[i:i + 1])
        torch.testing.assert_close(r[i:i + 1], ri, rtol=1e-4, atol=1e-5)
        assert bool(si[0]) == bool(s[i])


def test_fooled_rows_stop_costing_compute(cnn, test_images):
    sizes = []
    handle = cnn.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        deepfool(cnn, test_images, gradients="loop")  # "replicated" adds passes over copies
    finally:
        handle.remove()
    assert sizes[0] == len(test_images)  # the first step's forward also gives the clean prediction
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < len(test_images)


def test_vmap_gradients_equal_per_class_backward(cnn, test_images):
    xa = test_images[:4].clone().requires_grad_(True)
    z = cnn(xa)
    diffs = z[:, 1:] - z[:, :1]
    explicit = torch.stack([torch.autograd.grad(diffs[:, j].sum(), xa, retain_graph=True)[0]
                            for j in range(diffs.shape[1])], dim=1)
    batched = _candidate_grads(diffs, xa, {"ok": True})
    looped = _candidate_grads(diffs, xa, {"ok": False})  # last: it frees the graph
    torch.testing.assert_close(batched, explicit)
    torch.testing.assert_close(looped, explicit)


def test_replicated_gradients_equal_per_class_backward(cnn, test_images):
    xa = test_images[:5].clone().requires_grad_(True)
    z = cnn(xa)
    cls = z.detach().topk(4, dim=1).indices  # 3 candidates besides the predicted class
    zc = z.gather(1, cls)
    diffs = zc[:, 1:] - zc[:, :1]
    explicit = torch.stack([torch.autograd.grad(diffs[:, j].sum(), xa, retain_graph=True)[0]
                            for j in range(diffs.shape[1])], dim=1)
    layout = BatchLayout(torch.device("cpu"))
    layout.channels_last = False
    f, g = _replicated_grads(cnn, xa.detach(), cls, layout)
    torch.testing.assert_close(f, diffs.detach())
    torch.testing.assert_close(g, explicit)


@pytest.mark.parametrize("mode", ["batched", "replicated"])
@pytest.mark.parametrize("norm", [2, "inf"])
def test_every_gradient_mode_gives_the_same_deepfool(cnn, test_images, norm, mode):
    r_b, ok_b = deepfool(cnn, test_images[:16], norm=norm, gradients=mode)
    r_l, ok_l = deepfool(cnn, test_images[:16], norm=norm, gradients="loop")
    assert torch.equal(ok_b, ok_l)
    torch.testing.assert_close(r_b, r_l, rtol=1e-4, atol=1e-6)


def test_given_logits_save_the_first_forward_pass_and_change_nothing(cnn, test_images):
    x = test_images[:1]
    with torch.no_grad():
        z = cnn(x)
    sizes = []
    handle = cnn.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        r_own, ok_own = deepfool(cnn, x, gradients="replicated")
        own = list(sizes)
        sizes.clear()
        r_given, ok_given = deepfool(cnn, x, gradients="replicated", logits=z)
    finally:
        handle.remove()
    assert torch.equal(r_given, r_own) and torch.equal(ok_given, ok_own)
    assert own[0] == 1 and sizes == own[1:]  # only the step-0 classification pass is gone


def test_lookahead_classifies_the_callers_images_at_the_returned_r(cnn, test_images):
    x, others = test_images[:1], test_images[1:6]
    seen = []

    def images(r):
        seen.append(r.clone())
        return (others + r[0]).clamp(0, 1)

    look = Lookahead(images)
    r, ok = deepfool(cnn, x, lookahead=look)
    r_plain, ok_plain = deepfool(cnn, x)
    assert bool(ok[0]) and torch.equal(ok, ok_plain)
    torch.testing.assert_close(r, r_plain, rtol=1e-4, atol=1e-6)
    assert torch.equal(seen[-1], r)  # the last images were built from exactly the r returned
    with torch.no_grad():
        expected = cnn((others + r[0]).clamp(0, 1))
    torch.testing.assert_close(look.logits, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="one-image"):
        deepfool(cnn, test_images[:2], lookahead=Lookahead(images))


@pytest.mark.parametrize("mode", ["loop", "replicated"])
@pytest.mark.parametrize("norm", [2, "inf"])
def test_bf16_gradients_steer_while_fp32_decides(cnn, test_images, norm, mode):
    x = test_images[:24]
    r32, ok32 = deepfool(cnn, x, norm=norm, gradients=mode)
    r16, ok16 = deepfool(cnn, x, norm=norm, gradients=mode, precision="bf16")
    with torch.no_grad():
        clean, adv = cnn(x).argmax(1), cnn((x + r16).clamp(0, 1)).argmax(1)
    assert torch.equal(ok16, adv != clean)  # success is the fp32 model's verdict
    assert ok16.float().mean() >= ok32.float().mean() - 1 / len(x)
    size = (lambda r: r.flatten(1).norm(dim=1)) if norm == 2 else (lambda r: r.flatten(1).abs().amax(1))
    ratio = size(r16[ok16 & ok32]) / size(r32[ok16 & ok32])
    assert 0.9 < float(ratio.median()) < 1.1  # the same minimal perturbations, up to bf16 steering


def test_bf16_replicated_gradients_point_the_same_way(cnn, test_images):
    x = test_images[:4]
    with torch.no_grad():
        cls = cnn(x).topk(4, dim=1).indices
    layout = BatchLayout(torch.device("cpu"))
    _, g32 = _replicated_grads(cnn, x, cls, layout)
    _, g16 = _replicated_grads(cnn, x, cls, layout, torch.bfloat16)
    assert g16.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(g16.flatten(2), g32.flatten(2), dim=2)
    assert float(cosine.min()) > 0.98


def test_auto_gradients_replicate_small_cpu_inputs_only():
    """By input elements, not rows: 16 CIFAR images replicate, 17 loop, one 224² image loops."""
    cpu = torch.device("cpu")
    assert REPLICATE_MAX_ELEMENTS == 16 * 3 * 32 * 32
    assert _auto_gradients(cpu, torch.zeros(1, 3, 32, 32)) == _auto_gradients(cpu, torch.zeros(16, 3, 32, 32)) == "replicated"
    assert _auto_gradients(cpu, torch.zeros(17, 3, 32, 32)) == "loop"
    assert _auto_gradients(cpu, torch.zeros(1, 3, 224, 224)) == "loop"
    assert _auto_gradients(torch.device("cuda"), torch.zeros(1, 3, 32, 32)) == "batched"


def test_auto_uses_vmap_when_it_picks_batched(cnn, test_images, monkeypatch):
    """On CUDA ``auto`` resolves to ``"batched"`` per step; that step must really use vmap."""
    import sys

    module = sys.modules["uap.deepfool"]
    monkeypatch.setattr(module, "_auto_gradients", lambda device, xa: "batched")
    calls = []
    real_grad = torch.autograd.grad

    def spy(*args, **kwargs):
        calls.append(kwargs.get("is_grads_batched", False))
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    deepfool(cnn, test_images[:4])
    assert calls and all(calls)


def test_max_iter_zero_returns_no_perturbation(cnn, test_images):
    r, s = deepfool(cnn, test_images[:3], max_iter=0)
    assert torch.equal(r, torch.zeros_like(r)) and not bool(s.any())


class _BadOutput(nn.Module):
    def forward(self, x):
        return x.mean(dim=(1, 2, 3))  # N, not N×C


@pytest.mark.parametrize("kwargs,match", [
    ({"norm": 1}, "norm"), ({"norm": "l7"}, "norm"), ({"candidates": 1}, "candidates"),
    ({"overshoot": -0.1}, "overshoot"), ({"max_iter": -1}, "max_iter"), ({"gradients": "vmap"}, "gradients"),
    ({"precision": "fp16"}, "precision"), ({"logits": torch.zeros(3, 3)}, "logits"),
    ({"logits": torch.zeros(2, 1)}, "logits"),
])
def test_bad_arguments(kwargs, match):
    model, x0 = _affine_problem([0.0, -1.0, -2.0], n=2)
    with pytest.raises(ValueError, match=match):
        deepfool(model, x0, **kwargs)


def test_bad_model_output_and_images():
    with pytest.raises(ValueError, match="N×C"):
        deepfool(_BadOutput(), torch.rand(2, 3, 4, 4))
    model, _ = _affine_problem([0.0, -1.0, -2.0], n=1)
    with pytest.raises(ValueError, match="empty"):
        deepfool(model, torch.rand(0, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="N×C×H×W"):
        deepfool(model, torch.rand(3, 8, 8, dtype=torch.float64))


class _ViewMLP(nn.Module):
    """Calls ``.view`` on its input, which a channels-last batch cannot satisfy."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(x.view(x.shape[0], -1))


def test_models_that_reject_channels_last_input_still_work():
    model = _ViewMLP()
    x = torch.rand(6, 3, 8, 8)
    for mode in ("auto", "loop", "replicated"):
        r, ok = deepfool(model, x, gradients=mode)
        assert bool(ok.all())
        with pytest.raises(RuntimeError):  # the premise: this model cannot take the layout
            model(x.contiguous(memory_format=torch.channels_last))


def test_gradient_passes_are_split_to_the_budget_with_the_same_result(cnn, test_images, monkeypatch):
    import sys

    deepfool_module = sys.modules["uap.deepfool"]  # the module (the package's attribute is the function)
    r_whole, ok_whole = deepfool(cnn, test_images[:12], gradients="loop")
    sizes = []
    real = deepfool_module._linearise

    def recording(model, xa, *args):
        sizes.append(xa.shape[0])
        return real(model, xa, *args)

    monkeypatch.setattr(deepfool_module, "_linearise", recording)
    monkeypatch.setattr(deepfool_module, "GRADIENT_BUDGET", 5 * test_images[0].numel())  # five images per pass
    r_split, ok_split = deepfool(cnn, test_images[:12], gradients="loop")
    assert max(sizes) == 5 and sizes[:3] == [5, 5, 2]  # the first step's 12 rows in three passes
    assert torch.equal(ok_split, ok_whole)
    torch.testing.assert_close(r_split, r_whole, rtol=1e-4, atol=1e-6)
