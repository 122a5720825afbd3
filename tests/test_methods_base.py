"""The method abstraction: typed options for every method, Method objects, plugins, targets."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import uap
from tests.tiny_models import tiny_mlp
from uap import deepfool, project_lp
from uap.methods import Method, available_methods, get_method, make_method, register_method
from uap.options import Options, require
from uap.criteria import target_margin
from uap.universal import visiting_order


def _images(n: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


BUILT_IN = ["deepfool", "deepfool-batched", "deepfool-targeted", "sgd", "sga", "cos-uap", "feature",
            "foolbox:L2DeepFoolAttack"]


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_method_rejects_unknown_options_naming_the_known_ones(name):
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bogus'\].*known: .*batch_size"):
        make_method(name, {"bogus": 1})


@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize("value", ["8", 2.5, True, None])
def test_every_method_rejects_ill_typed_options(name, value):
    with pytest.raises(ValueError, match="batch_size.*must be an integer"):
        make_method(name, {"batch_size": value})


def test_range_checks_and_well_typed_values():
    assert make_method("sgd", {"step_size": 1}).options.step_size == 1  # an int is a number
    with pytest.raises(ValueError, match="decay"):
        make_method("sgd", {"decay": 0.0})
    with pytest.raises(ValueError, match="chunk_size"):
        make_method("deepfool", {"chunk_size": 0})
    with pytest.raises(ValueError, match="step_size.*a number"):
        make_method("feature", {"step_size": float("nan")})
    assert make_method("deepfool-batched").options.batch_size == 32
    assert make_method("foolbox:L2DeepFoolAttack", {"attack_options": {"steps": 5}}).options.attack_options == {"steps": 5}
    with pytest.raises(ValueError, match="no attack"):
        make_method("foolbox:NoSuchAttack")


@pytest.mark.parametrize("name", ["deepfool", "deepfool-batched", "deepfool-targeted"])
def test_deepfool_settings_are_options_of_the_deepfool_methods(name):
    method = make_method(name, {"overshoot": 0.05, "precision": "bf16", "norm": "inf", "max_iter": 7,
                                "candidates": 3, "chunk_size": 4})
    assert method.options.deepfool() == {"norm": "inf", "candidates": 3, "overshoot": 0.05, "max_iter": 7,
                                         "precision": "bf16"}
    assert make_method(name).options.deepfool() == {"norm": 2, "candidates": 10, "overshoot": 0.02, "max_iter": 50,
                                                    "precision": "fp32"}  # the paper's
    for bad, match in [({"candidates": "3"}, "candidates.*an integer"), ({"candidates": 1}, "candidates must be"),
                       ({"precision": "fp16"}, "precision.*one of"), ({"norm": 1}, "norm 2 or inf"),
                       ({"overshoot": -0.1}, "overshoot"), ({"chunk_size": 0}, "chunk_size")]:
        with pytest.raises(ValueError, match=match):
            make_method(name, bad)


def test_deepfool_settings_are_refused_by_methods_that_do_not_run_deepfool():
    model, x = tiny_mlp(), _images(8)
    for method in ("sgd", "feature", "foolbox:L2DeepFoolAttack"):
        for option in ({"precision": "bf16"}, {"overshoot": 0.05}, {"precision": "fp32"}):
            with pytest.raises(ValueError, match=rf"unknown option\(s\) \['{next(iter(option))}'\] for method"):
                uap.craft(model, x, eps=0.1, method=method, method_options=option)
    with pytest.raises(TypeError, match="deepfool_options"):  # no DeepFool argument on the driver any more
        uap.craft(model, x, eps=0.1, deepfool_options={"overshoot": 0.05})


def test_deepfool_settings_change_the_run_and_are_recorded_with_the_precision_used():
    model, x = tiny_mlp(), _images(16)
    run = dict(eps=0.05, norm=math.inf, max_passes=1, seed=0)
    plain = uap.craft(model, x, **run)
    wider = uap.craft(model, x, method_options={"overshoot": 0.5, "max_iter": 3}, **run)
    assert not torch.equal(plain.v, wider.v)
    assert wider.extra["deepfool"] == {"norm": "2", "candidates": 10, "overshoot": 0.5, "max_iter": 3,
                                       "precision": "fp32"}
    assert wider.extra["method_options"] == {"overshoot": 0.5, "max_iter": 3}
    assert wider.extra["counters"] == ["deepfool_calls"] and "deepfool" not in uap.craft(model, x, method="sgd", **run).extra


def test_targets_are_checked_against_what_a_method_supports():
    model, x = tiny_mlp(), _images(8)
    with pytest.raises(ValueError, match="untargeted"):
        uap.craft(model, x, eps=0.1, method="feature", target=1)
    with pytest.raises(ValueError, match="needs a target"):
        uap.craft(model, x, eps=0.1, method="deepfool-targeted")


def test_a_method_object_and_a_plugin_class_with_typed_options():
    @dataclass(frozen=True)
    class ScaleOptions(Options):
        scale: float = 0.5

        def check(self) -> None:
            require(0 < self.scale <= 1, "scale must be in (0, 1]")

    @register_method()
    class ConstantSign(Method):
        """v = scale · ε · sign(mean image − 0.5), in one pass."""

        name = "test-constant-sign"
        Options = ScaleOptions

        def run_pass(self, ctx):
            ctx.v = ctx.project(self.options.scale * ctx.eps * (ctx.x.mean(0) - 0.5).sign())
            ctx.visited = ctx.order.numel()

    model, x = tiny_mlp(), _images()
    by_name = uap.craft(model, x, eps=0.1, max_passes=1, method="test-constant-sign", method_options={"scale": 0.25})
    by_object = uap.craft(model, x, eps=0.1, max_passes=1, method=ConstantSign({"scale": 0.25}))
    assert torch.equal(by_name.v, by_object.v) and by_name.method == by_object.method == "test-constant-sign"
    assert by_name.v.abs().max().item() == pytest.approx(0.025)
    assert "test-constant-sign" in available_methods() and get_method("test-constant-sign") is ConstantSign
    with pytest.raises(ValueError, match="scale"):
        uap.craft(model, x, eps=0.1, method="test-constant-sign", method_options={"scale": 2.0})
    with pytest.raises(ValueError, match="Method object itself"):
        uap.craft(model, x, eps=0.1, method=ConstantSign(), method_options={"scale": 0.5})


def test_a_function_plugin_takes_no_options_unless_it_declares_them():
    @register_method("test-fn-noop")
    def _noop(ctx):
        ctx.visited = ctx.order.numel()

    with pytest.raises(ValueError, match="known: none"):
        uap.craft(tiny_mlp(), _images(8), eps=0.1, method="test-fn-noop", method_options={"x": 1})


def _reference_targeted_algorithm1(model, x, *, eps, p, target, max_passes, seed, df):
    """Targeted Algorithm 1 written plainly: one image at a time, the accept rule spelled out."""
    def margin(xi, v):
        with torch.no_grad():
            return float(target_margin(model((xi + v).clamp(0, 1)), target)[0])

    v = torch.zeros(x.shape[1:])
    updates, calls = [], []
    for k in range(1, max_passes + 1):
        n_updates = n_calls = 0
        for i in visiting_order(len(x), seed, k).tolist():
            xi = x[i:i + 1]
            if margin(xi, v) <= 0:
                r, ok = deepfool(model, (xi + v).clamp(0, 1), target=target, **df)
                n_calls += 1
                candidate = project_lp(v + r[0], eps, p)
                if bool(ok[0]) and margin(xi, candidate) > margin(xi, v):
                    v, n_updates = candidate, n_updates + 1
        updates.append(n_updates)
        calls.append(n_calls)
    return v, updates, calls


@pytest.mark.parametrize("p,eps", [(math.inf, 0.05), (2.0, 0.8)])
def test_targeted_algorithm1_matches_a_plain_loop_update_for_update(p, eps):
    model, x = tiny_mlp(), _images()
    df = {"max_iter": 3, "norm": 2}
    pert = uap.craft(model, x, eps=eps, norm=p, delta=0.01, max_passes=2, seed=5, target=0,
                     method_options={"chunk_size": 4, **df})
    v_ref, updates, calls = _reference_targeted_algorithm1(model, x, eps=eps, p=p, target=0, max_passes=2,
                                                          seed=5, df=df)
    assert [r["updates"] for r in pert.history] == updates
    assert [r["deepfool_calls"] for r in pert.history] == calls
    assert sum(calls) > sum(updates) > 0  # some steps were rejected: the accept rule was exercised
    torch.testing.assert_close(pert.v, v_ref, rtol=0, atol=1e-5)


def test_a_method_counts_its_own_work_and_the_driver_records_it_by_name():
    @dataclass(frozen=True)
    class CountingOptions(Options):
        batch_size: int = 4

    @register_method("counting-probe")
    class Counting(Method):
        name, Options, counters = "counting-probe", CountingOptions, ("probes", "batches")

        def run_pass(self, ctx) -> None:
            for idx in ctx.order.split(self.options.batch_size):
                ctx.count("batches")
                ctx.count("probes", idx.numel())
                ctx.visited += idx.numel()

        def describe(self, device):
            return {"counting": {"device": str(device)}}

    events = []
    model, x = tiny_mlp(), _images(10)
    pert = uap.craft(model, x, eps=0.1, method="counting-probe", max_passes=2, delta=0, callback=events.append)
    assert [(r["probes"], r["batches"]) for r in pert.history] == [(10, 3), (10, 3)]  # zero again each pass
    assert list(pert.history[0])[6:9] == ["visited", "probes", "batches"]  # where the counters sit in a record
    assert "deepfool_calls" not in pert.history[0]  # the driver names no method's counter
    assert pert.extra["counters"] == ["probes", "batches"] and pert.extra["counting"] == {"device": "cpu"}
    assert all("probes" in e for e in events if e["event"] == "progress")
    summary = uap.runs.summarize(pert, {})
    assert summary["counters"] == {"probes": 20, "batches": 6}

    @register_method("miscounting-probe")
    def miscounting(ctx) -> None:
        ctx.count("probes")

    with pytest.raises(ValueError, match=r"counts 'probes' but declares only the counters \[\]"):
        uap.craft(model, x, eps=0.1, method="miscounting-probe", max_passes=1)

    class Clashing(Counting):
        def describe(self, device):
            return {"n_images": 3}

    with pytest.raises(ValueError, match=r"reserved extra key\(s\) \['n_images'\]"):
        uap.craft(model, x, eps=0.1, method=Clashing(), max_passes=1)
