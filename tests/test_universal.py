"""craft: Algorithm 1 against a plain reference loop, stop rule, resume, methods, bad input."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.tiny_models import tiny_mlp
from uap import Perturbation, craft, deepfool, project_lp
from uap.methods import available_methods, get_method, register_method
from uap.universal import visiting_order

DF = {"max_iter": 3}  # few DeepFool steps: some calls fail, which exercises the accept rule


def _images(n: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _reference_algorithm1(model, x, *, eps, p, delta, max_passes, seed, df, refine=0, step_size=1.0):
    """Algorithm 1 written plainly: one image at a time, no chunking, no batching (with
    ``refine``: more DeepFool steps from the projected point while x_i is not fooled there)."""
    with torch.no_grad():
        clean = [int(model(x[i:i + 1]).argmax()) for i in range(len(x))]

    def fooling(v):
        with torch.no_grad():
            return sum(int(model((x[i:i + 1] + v).clamp(0, 1)).argmax()) != clean[i] for i in range(len(x))) / len(x)

    v = torch.zeros(x.shape[1:])
    passes, updates, calls = 0, [], []
    while fooling(v) <= 1 - delta and passes < max_passes:
        passes += 1
        n_updates = n_calls = 0
        for i in visiting_order(len(x), seed, passes).tolist():
            xi = (x[i:i + 1] + v).clamp(0, 1)
            with torch.no_grad():
                still = int(model(xi).argmax()) == clean[i]
            if still:
                r, ok = deepfool(model, xi, **{**{"norm": 2}, **df})
                n_calls += 1
                if bool(ok[0]):
                    v = project_lp(v + step_size * r[0], eps, p)
                    n_updates += 1
                    for _ in range(refine):
                        xi = (x[i:i + 1] + v).clamp(0, 1)
                        with torch.no_grad():
                            if int(model(xi).argmax()) != clean[i]:
                                break
                        r, ok = deepfool(model, xi, **{**{"norm": 2}, **df})
                        n_calls += 1
                        if not bool(ok[0]):
                            break
                        v = project_lp(v + r[0], eps, p)
        updates.append(n_updates)
        calls.append(n_calls)
    return v, updates, calls


@pytest.mark.parametrize("p,eps", [(math.inf, 0.06), (2.0, 1.0)])
def test_deepfool_method_matches_reference_loop(p, eps):
    model, x = tiny_mlp(), _images()
    pert = craft(model, x, eps=eps, norm=p, delta=0.05, max_passes=3, seed=3, method="deepfool",
                 method_options={"chunk_size": 4, **DF})
    v_ref, updates, calls = _reference_algorithm1(model, x, eps=eps, p=p, delta=0.05, max_passes=3, seed=3, df=DF)
    assert [r["updates"] for r in pert.history] == updates
    assert [r["deepfool_calls"] for r in pert.history] == calls
    assert sum(calls) > sum(updates)  # some DeepFool calls failed and were rejected
    torch.testing.assert_close(pert.v, v_ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 8])
def test_refine_matches_the_reference_loop(chunk):
    model, x = tiny_mlp(), _images()
    # (at ε = 0.03 a DeepFool call on the edge flips with the batch it is classified in, as
    # float rounding decides it: the one-image reference classifies alone)
    run = dict(eps=0.05, delta=0.05, max_passes=3, seed=3)
    pert = craft(model, x, norm=math.inf, method="deepfool",
                 method_options={"refine": 2, "chunk_size": chunk, **DF}, **run)
    v_ref, updates, calls = _reference_algorithm1(model, x, p=math.inf, df=DF, refine=2, **run)
    assert [r["updates"] for r in pert.history] == updates
    assert [r["deepfool_calls"] for r in pert.history] == calls
    torch.testing.assert_close(pert.v, v_ref, rtol=0, atol=1e-5)
    paper = craft(model, x, norm=math.inf, method="deepfool", method_options=DF, **run)
    assert sum(calls) > sum(r["deepfool_calls"] for r in paper.history)  # the refinement ran
    assert not torch.equal(paper.v, pert.v)


@pytest.mark.parametrize("method, options", [("deepfool", {"chunk_size": 4}), ("deepfool-batched", {"batch_size": 1})])
@pytest.mark.parametrize("eps, alpha", [(0.04, 0.3), (0.08, 0.5)])
def test_step_size_matches_the_reference_loop(method, options, eps, alpha):
    # A partial step leaves images near their decision boundary, where whether one is still
    # fooled can depend on the batch it is classified in (float rounding): the reference
    # classifies one image at a time, the engine in chunks. These settings have no such tie.
    model, x = tiny_mlp(), _images()
    run = dict(eps=eps, delta=0.05, max_passes=3, seed=3)
    pert = craft(model, x, norm=math.inf, method=method,
                 method_options={**options, "step_size": alpha, **DF}, **run)
    v_ref, updates, calls = _reference_algorithm1(model, x, p=math.inf, df=DF, step_size=alpha, **run)
    assert [r["updates"] for r in pert.history] == updates
    torch.testing.assert_close(pert.v, v_ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="step_size"):
        craft(model, x, eps=0.06, method=method, method_options={"step_size": 0})


def test_algorithm1_checks_the_next_images_inside_deepfool_after_an_update(monkeypatch):
    from uap.methods.base import CraftContext

    calls = []
    real = CraftContext.logits
    monkeypatch.setattr(CraftContext, "logits", lambda self, idx: calls.append(len(idx)) or real(self, idx))
    model, x = tiny_mlp(), _images()
    pert = craft(model, x, eps=0.06, max_passes=1, delta=0.05)
    updates = pert.history[0]["updates"]
    assert updates > 5
    # Without the lookahead every update would be followed by a chunk check of its own.
    assert len(calls) < updates


def test_chunk_size_does_not_change_the_result():
    model, x = tiny_mlp(), _images()
    a = craft(model, x, eps=0.06, max_passes=2, delta=0.05, method_options={"chunk_size": 1, "max_chunk_size": 1})
    b = craft(model, x, eps=0.06, max_passes=2, delta=0.05, method_options={"chunk_size": 64})
    torch.testing.assert_close(a.v, b.v, rtol=0, atol=1e-6)


def test_batched_with_batch_size_one_is_algorithm1():
    model, x = tiny_mlp(), _images()
    a = craft(model, x, eps=0.06, max_passes=2, delta=0.05, method="deepfool")
    b = craft(model, x, eps=0.06, max_passes=2, delta=0.05, method="deepfool-batched",
              method_options={"batch_size": 1})
    torch.testing.assert_close(a.v, b.v, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["deepfool", "deepfool-batched"])
@pytest.mark.parametrize("p,eps", [(math.inf, 0.1), (2.0, 1.5), (1.0, 10.0)])
def test_result_in_ball_and_history_complete(method, p, eps):
    model, x = tiny_mlp(), _images()
    held = _images(30, seed=2)
    pert = craft(model, x, eps=eps, norm=p, max_passes=2, delta=0.01, method=method, heldout=held, seed=0)
    assert torch.linalg.vector_norm(pert.v.flatten(), ord=p) <= eps * (1 + 1e-5)
    assert 1 <= pert.passes <= 2
    for k, record in enumerate(pert.history, start=1):
        assert record["pass"] == k
        for key in ("fooling_rate", "heldout_fooling_rate", "norm_2", "norm_inf", "visited", "deepfool_calls",
                    "updates", "seconds"):
            assert record[key] is not None, key
        assert record["visited"] == len(x)
    assert pert.fooling_rate > 0.2  # the perturbation actually fools this network
    assert pert.method == method and pert.eps == eps and pert.p == p


def test_a_fresh_run_does_not_measure_v_zero(monkeypatch):
    import uap.universal as universal

    seen = []
    real = universal.predict

    def spy(model, x, v, **kw):
        seen.append(bool((v == 0).all()))
        return real(model, x, v, **kw)

    monkeypatch.setattr(universal, "predict", spy)
    model, x = tiny_mlp(), _images()
    craft(model, x, eps=0.06, max_passes=1)
    assert seen and not any(seen)  # Err(X_0) = 0 for images in [0, 1]: known without a pass
    with pytest.raises(ValueError, match=r"\[0, 1\]"):  # images outside [0, 1] are refused, not clipped
        craft(model, 2 * x - 0.5, eps=0.06, max_passes=1)


def test_stop_rule_and_max_passes():
    model, x = tiny_mlp(), _images()
    easy = craft(model, x, eps=0.3, norm="inf", delta=0.9, max_passes=5)
    assert easy.passes == 1 and easy.fooling_rate > 0.1  # Err > 1 − δ after the first pass
    capped = craft(model, x, eps=0.01, norm="inf", delta=0.01, max_passes=2)
    assert capped.passes == 2 and capped.fooling_rate <= 0.99


def test_resume_continues_the_same_run():
    model, x = tiny_mlp(), _images()
    full = craft(model, x, eps=0.04, max_passes=3, delta=0.01, seed=5)
    first = craft(model, x, eps=0.04, max_passes=1, delta=0.01, seed=5)
    resumed = craft(model, x, eps=0.04, max_passes=3, delta=0.01, seed=5, resume=first)
    assert resumed.passes == full.passes
    torch.testing.assert_close(resumed.v, full.v, rtol=0, atol=1e-6)


def test_callback_sees_progress_and_can_stop():
    model, x = tiny_mlp(), _images()
    events = []

    def callback(event):
        events.append(event)
        return event["event"] == "pass"  # stop after the first pass

    pert = craft(model, x, eps=0.01, max_passes=4, delta=0.01, callback=callback)
    assert pert.passes == 1
    assert events[-1]["event"] == "pass" and events[-1]["v"].shape == x.shape[1:]
    assert any(e["event"] == "progress" and e["visited"] == len(x) for e in events)


def test_heldout_with_labels_records_accuracy():
    model, x = tiny_mlp(), _images()
    hx = _images(20, seed=9)
    hy = torch.randint(0, 5, (20,), generator=torch.Generator().manual_seed(0))
    pert = craft(model, x, eps=0.05, max_passes=1, heldout=(hx, hy))
    assert 0 <= pert.history[0]["heldout_accuracy"] <= 1
    assert pert.extra["clean_heldout_accuracy"] is not None


def test_registry_plugs_in_new_methods():
    calls = []

    @register_method("test-noop")
    def _noop(ctx):
        calls.append(ctx.pass_index)
        ctx.visited = ctx.order.numel()

    pert = craft(tiny_mlp(), _images(), eps=0.1, max_passes=2, method="test-noop")
    assert calls == [1, 2] and pert.passes == 2 and torch.equal(pert.v, torch.zeros_like(pert.v))
    assert "test-noop" in available_methods() and get_method("test-noop") is _noop


def _scripted_method(name: str, vs: list[torch.Tensor]):
    """A registered method whose pass k sets v to ``vs[k - 1]`` (fooling rates we choose)."""
    @register_method(name)
    def _scripted(ctx):
        ctx.v = vs[ctx.pass_index - 1]
        ctx.visited = ctx.order.numel()


def test_keep_best_returns_the_pass_with_the_highest_crafting_rate(tmp_path):
    model, x = tiny_mlp(), _images()
    big = craft(model, x, eps=0.1, max_passes=1, delta=0.01).v  # fools some images
    small = 0.3 * big
    _scripted_method("test-scripted", [big, torch.zeros_like(big), small])
    last = craft(model, x, eps=0.3, max_passes=3, delta=0.001, method="test-scripted")
    best = craft(model, x, eps=0.3, max_passes=3, delta=0.001, method="test-scripted", keep_best=True,
                 heldout=_images(10, seed=3))
    rates = [r["fooling_rate"] for r in best.history]
    assert len(rates) == 3 and rates[0] > max(rates[1:])  # the script really is non-monotone
    torch.testing.assert_close(last.v, small)
    torch.testing.assert_close(best.v, big)
    assert best.extra["best_pass"] == 1 and "best_pass" not in last.extra
    assert best.fooling_rate == rates[0] and best.heldout_fooling_rate == best.history[0]["heldout_fooling_rate"]
    assert last.fooling_rate == rates[2]
    best.save(tmp_path / "best.safetensors")
    loaded = Perturbation.load(tmp_path / "best.safetensors")
    assert loaded.extra["best_pass"] == 1 and loaded.fooling_rate == rates[0]


def test_keep_best_keeps_the_start_when_no_pass_improves():
    model, x = tiny_mlp(), _images()
    zero = torch.zeros(x.shape[1:])
    _scripted_method("test-scripted-zero", [zero, zero])
    pert = craft(model, x, eps=0.1, max_passes=2, delta=0.001, method="test-scripted-zero", keep_best=True)
    assert pert.extra["best_pass"] == 0 and pert.passes == 2 and torch.equal(pert.v, zero)


class _Flat(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :1].squeeze(1)


@pytest.mark.parametrize("kwargs,match", [
    ({"eps": 0}, "eps"), ({"eps": -1}, "eps"), ({"eps": 2}, "pixel scale"), ({"eps": float("nan")}, "eps"),
    ({"norm": 3}, "norm"), ({"norm": "l7"}, "norm"),
    ({"delta": -0.1}, "delta"), ({"delta": 1.0}, "delta"), ({"delta": 1.5}, "delta"),
    ({"max_passes": 0}, "max_passes"), ({"method": "nope"}, "unknown method"),
    ({"method_options": {"steps": 3}}, r"unknown option\(s\) \['steps'\] for method 'deepfool'"),
    ({"heldout": torch.rand(4, 3, 9, 9)}, "held-out"),
    ({"resume": Perturbation(v=torch.zeros(3, 9, 9))}, "does not match"),
])
def test_bad_input_is_value_error(kwargs, match):
    args = {"eps": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        craft(tiny_mlp(), _images(8), **args)


def test_empty_set_and_bad_model_output():
    with pytest.raises(ValueError, match="empty"):
        craft(tiny_mlp(), torch.rand(0, 3, 8, 8), eps=0.1)
    with pytest.raises(ValueError, match="N×C"):
        craft(_Flat(), _images(8), eps=0.1)


def test_delta_zero_is_a_fixed_budget_of_passes():
    """δ = 0 never stops early, not even with every image fooled: a fixed number of passes, as
    in published budgets of "k epochs"; a loose δ stops as soon as the rule is met."""
    torch.manual_seed(0)
    model, x = tiny_mlp(), _images()
    loose = craft(model, x, eps=0.5, max_passes=4, delta=0.99, method="sgd", seed=0)
    fixed = craft(model, x, eps=0.5, max_passes=4, delta=0.0, method="sgd", seed=0)
    assert len(loose.history) == 1
    assert len(fixed.history) == 4 and fixed.history[-2]["fooling_rate"] == 1.0
    with pytest.raises(ValueError, match=r"delta must be in \[0, 1\)"):
        craft(model, x, eps=0.5, delta=-0.1)
