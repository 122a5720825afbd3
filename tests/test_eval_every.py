"""Measuring the rates on a schedule (``eval_every``): every reported rate is the exact one, and
the passes not measured say so."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import uap
from cli import app
from cli.show import craft_table
from tests.tiny_models import randomise_batchnorm, tiny_cnn
from uap.criteria import targeted_success_rate
from uap.metrics import accuracy, fooling_rate
from uap.runs import RunFolder, craft_run, summarize
from uap.sweep import Sweep, _eps_key

pytestmark = pytest.mark.filterwarnings("ignore:.*no better than chance")
EPS = 8 / 255
RATES = ("fooling_rate", "heldout_fooling_rate", "heldout_accuracy")


@pytest.fixture(scope="module")
def setup():
    model = randomise_batchnorm(tiny_cnn())
    x = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    hx = torch.rand(20, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    hy = torch.randint(0, 10, (20,), generator=torch.Generator().manual_seed(3))
    return model, x, (hx, hy)


def _craft(setup, **kwargs):
    model, x, heldout = setup
    vs: list[torch.Tensor] = []

    def keep_v(event):
        if event["event"] == "pass":
            vs.append(event["v"])

    options = {"eps": EPS, "method": "sgd", "delta": 0.0, "max_passes": 5, "seed": 4, **kwargs}
    return uap.craft(model, x, heldout=heldout, callback=keep_v, **options), vs


def _without_seconds(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.mark.parametrize("target", [None, 3])
def test_every_pass_records_the_rates_of_its_v(setup, target):
    """eval_every=1 (the default): each record holds the metrics of that pass's v, computed afresh."""
    model, x, (hx, hy) = setup
    pert, vs = _craft(setup, target=target, max_passes=3)
    for record, v in zip(pert.history, vs):
        assert "measured" not in record
        assert record["fooling_rate"] == fooling_rate(model, x, v)
        assert record["heldout_fooling_rate"] == fooling_rate(model, hx, v)
        assert record["heldout_accuracy"] == accuracy(model, hx, hy, v)
        if target is not None:
            assert record["targeted_success_rate"] == targeted_success_rate(model, x, v, target)
            assert record["heldout_targeted_success_rate"] == targeted_success_rate(model, hx, v, target)


@pytest.mark.parametrize("target", [None, 3])
def test_a_schedule_measures_fewer_passes_and_changes_nothing_else(setup, target):
    every, _ = _craft(setup, target=target)
    sparse, _ = _craft(setup, target=target, eval_every=2)
    assert torch.equal(sparse.v, every.v)  # the rates are read, never used, with delta = 0
    measured = [r["pass"] for r in sparse.history if r["measured"]]
    assert measured == [2, 4, 5]  # every 2nd, and the last (max_passes) always
    keys = RATES + (("targeted_success_rate", "heldout_targeted_success_rate") if target is not None else ())
    for full, part in zip(_without_seconds(every.history), _without_seconds(sparse.history)):
        part = dict(part)
        if part.pop("measured"):
            assert part == full
        else:
            assert all(part[k] is None for k in keys)
            assert part == {**full, **{k: None for k in keys}}
    assert sparse.fooling_rate == every.fooling_rate and sparse.heldout_fooling_rate == every.heldout_fooling_rate


def test_with_delta_the_crafting_set_is_measured_every_pass(setup):
    every, _ = _craft(setup, delta=0.5, max_passes=6)
    sparse, _ = _craft(setup, delta=0.5, max_passes=6, eval_every=4)
    assert torch.equal(sparse.v, every.v) and sparse.passes == every.passes
    assert [r["fooling_rate"] for r in sparse.history] == [r["fooling_rate"] for r in every.history]
    last = sparse.history[-1]
    assert last["measured"] and last["heldout_fooling_rate"] == every.history[-1]["heldout_fooling_rate"]
    for full, part in zip(every.history, sparse.history):
        expected = full["heldout_fooling_rate"] if part["pass"] % 4 == 0 or part is last else None
        assert part["heldout_fooling_rate"] == expected


def test_the_pass_the_stop_rule_ends_on_is_measured(setup):
    every, _ = _craft(setup, eps=2 * EPS, delta=0.5, max_passes=10)
    pert, _ = _craft(setup, eps=2 * EPS, delta=0.5, max_passes=10, eval_every=7)
    assert 1 < pert.passes < 7 and pert.fooling_rate > 0.5, "the stop rule should end this run early"
    assert pert.history[-1]["measured"] and pert.heldout_fooling_rate == every.heldout_fooling_rate is not None
    assert all(not r["measured"] and r["heldout_fooling_rate"] is None for r in pert.history[:-1])


def test_resuming_a_scheduled_run_equals_the_uninterrupted_one(setup):
    straight, _ = _craft(setup, eval_every=3)
    first, _ = _craft(setup, eval_every=3, max_passes=2)  # a checkpoint after an unmeasured pass
    assert first.history[-1]["measured"]  # its last pass: measured, but pass 1 is not
    interrupted = uap.Perturbation(v=first.v, model=first.model, data=first.data, eps=first.eps, norm=first.norm,
                                   delta=first.delta, method=first.method, seed=first.seed,
                                   history=[dict(h, measured=False, **{k: None for k in RATES}) if h["pass"] == 2
                                            else h for h in first.history],
                                   seconds=first.seconds, extra=first.extra)
    resumed = uap.craft(setup[0], setup[1], heldout=setup[2], eps=EPS, method="sgd", delta=0.0, max_passes=5,
                        seed=4, eval_every=3, resume=interrupted)
    assert torch.equal(resumed.v, straight.v)
    assert _without_seconds(resumed.history[2:]) == _without_seconds(straight.history[2:])


class Interrupt(Exception):
    pass


def test_a_run_folder_resumes_a_scheduled_run_exactly(setup, tmp_path):
    model, x, heldout = setup
    options = dict(eps=EPS, method="sgd", delta=0.0, max_passes=4, seed=4, eval_every=3)
    straight = craft_run(tmp_path / "straight", model, x, heldout=heldout, **options)

    def stop_after_pass_1(event):
        if event["event"] == "pass" and event["pass"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        craft_run(tmp_path / "run", model, x, heldout=heldout, callback=stop_after_pass_1, **options)
    saved = RunFolder(tmp_path / "run").load_checkpoint()
    assert saved.history[0]["measured"] is False and saved.history[0]["fooling_rate"] is None
    resumed = craft_run(tmp_path / "run", model, x, heldout=heldout, resume=True, **options)
    assert resumed.resumed_passes == 1
    assert torch.equal(resumed.perturbation.v, straight.perturbation.v)
    assert _without_seconds(resumed.perturbation.history) == _without_seconds(straight.perturbation.history)
    assert [r["measured"] for r in straight.perturbation.history] == [False, False, True, True]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["fooling_rate"] == straight.perturbation.fooling_rate is not None


def test_a_record_without_eval_every_is_the_same_run_as_eval_every_1(setup, tmp_path):
    model, x, heldout = setup
    options = dict(eps=EPS, method="sgd", delta=0.0, max_passes=1, seed=4)
    first = craft_run(tmp_path / "run", model, x, heldout=heldout, **options)
    marker = RunFolder(tmp_path / "run").marker_path
    record = json.loads(marker.read_text())
    del record["craft"]["eval_every"]  # what a record written before the argument existed holds
    marker.write_text(json.dumps(record))
    again = craft_run(tmp_path / "run", model, x, heldout=heldout, eval_every=1, **options)
    assert again.reused and torch.equal(again.perturbation.v, first.perturbation.v)
    with pytest.raises(uap.runs.SettingsMismatch, match="eval_every"):
        craft_run(tmp_path / "run", model, x, heldout=heldout, eval_every=2, **options)


def test_tables_show_unmeasured_passes_as_dashes(setup):
    pert, _ = _craft(setup, eval_every=2, max_passes=3)
    assert pert.history[0]["fooling_rate"] is None
    summary = summarize(pert, {"craft": {"method": "sgd"}})
    craft_table(summary)  # the kept v is the last pass: measured
    pert.history[-1].update({k: None for k in RATES})  # a run a callback stopped on an unmeasured pass
    summary = summarize(pert, {"craft": {"method": "sgd"}})
    assert summary["fooling_rate"] is None and "–" in summary["stopped"]["text"]
    craft_table(summary)
    rows = [{"axis": "passes", "value": i, "method": "sgd", "eps": EPS, "heldout_fooling_rate": r}
            for i, r in enumerate([None, 0.4, None], start=1)]
    sweep = Sweep(rows=rows, baselines={_eps_key(EPS): {"name": "noise", "heldout_fooling_rate": 0.3}})
    assert sweep.curve("sgd", "passes") == [(2, 0.4)]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_eval_every_must_be_a_positive_integer(setup, bad):
    with pytest.raises(ValueError, match="eval_every"):
        _craft(setup, eval_every=bad)


def test_keep_best_needs_every_pass(setup):
    with pytest.raises(ValueError, match="keep_best"):
        _craft(setup, eval_every=2, keep_best=True)
    result = CliRunner().invoke(app, ["craft", "--model", "tests.tiny_models:tiny_linear", "--eval-every", "2",
                                      "--keep-best", "--out", "unused"])
    try:
        err = result.stderr
    except ValueError:  # older click mixes the streams
        err = result.output
    assert result.exit_code == 2 and "--eval-every 1" in err and "Traceback" not in err
