"""``uap.transfer_matrix`` and its baseline rows."""
from __future__ import annotations

import json

import pytest
import torch

import uap.universal
from tests.eval_models import EncoderTarget, LinearTarget, images
from uap.baselines import BASELINES, CHESSBOARDS
from uap.metrics import fooling_rate
from uap.transfer import RANDOM_ROW, Transfer, transfer_matrix

EPS = 0.25  # large for 8×8 toy images, so the crafted UAPs really fool the tiny models
SETTINGS = dict(eps=EPS, norm="inf", delta=0.2, max_passes=2, seed=0, batch_size=5)


# ---------------------------------------------------------------------------- transfer matrix

@pytest.fixture(scope="module")
def setup():
    x_craft, _ = images(n=16, seed=10)
    x_eval, y_eval = images(n=12, seed=11)
    models = {"lin": LinearTarget(seed=0), "probe": EncoderTarget(seed=1)}
    return models, x_craft, x_eval, y_eval


@pytest.fixture(scope="module")
def result(setup) -> Transfer:
    models, x_craft, x_eval, y_eval = setup
    return transfer_matrix(models, x_craft, x_eval, y_eval, **SETTINGS)


BASELINE_ROWS = [RANDOM_ROW, "gaussian", *CHESSBOARDS,
                 "fourier:lin", "fourier:probe"]


def test_matrix_shape_rows_and_baseline_rows(result):
    r = result.report
    assert r.models == ["lin", "probe"]
    assert r.perturbations == ["lin", "probe", *BASELINE_ROWS]
    assert r.baselines == BASELINE_ROWS and not r.is_baseline("lin")
    assert r.fooling_rate.shape == (2 + len(BASELINE_ROWS), 2)
    assert list(result.perturbations) == r.perturbations
    assert result.reused == []
    assert r.meta["eps"] == EPS and r.meta["norm"] == "inf" and r.meta["baseline_p"] == "inf"
    assert r.meta["n_craft"] == 16
    assert r.meta["baselines"]["fourier:probe"]["model"] == "probe"
    assert r.meta["baselines"]["fourier:lin"]["n_images"] == 16  # the crafting images


def test_baselines_can_be_chosen_or_left_out(setup):
    models, x_craft, x_eval, y_eval = setup
    some = transfer_matrix(models, x_craft, x_eval, y_eval, baselines="random,chessboard", **SETTINGS)
    assert some.report.baselines == [RANDOM_ROW, *CHESSBOARDS]
    none = transfer_matrix(models, x_craft, x_eval, y_eval, baselines=(), **SETTINGS)
    assert none.report.perturbations == ["lin", "probe"] and none.report.baselines == []
    assert set(BASELINES) >= {"random", "fourier"}


def test_fourier_rows_are_searched_on_the_crafting_images_only(setup, result, monkeypatch):
    """The Fourier search sees x_craft and nothing else: other held-out images, same rows."""
    import uap.baselines.fourier

    models, x_craft, x_eval, y_eval = setup
    seen = []
    search = uap.baselines.fourier.fourier_search

    def spy(model, x, *args, **kwargs):
        seen.append(x)
        return search(model, x, *args, **kwargs)

    monkeypatch.setattr(uap.baselines.fourier, "fourier_search", spy)
    other_eval, _ = images(n=12, seed=99)
    events = []
    again = transfer_matrix(models, x_craft, other_eval, callback=lambda e, i: events.append((e, i)), **SETTINGS)
    assert len(seen) == 2 and all(x is x_craft for x in seen)
    assert [i for e, i in events if e == "baseline"] == [{"baseline": "fourier", "model": m} for m in ("lin", "probe")]
    for row in ("fourier:lin", "fourier:probe"):
        assert torch.equal(again.perturbations[row], result.perturbations[row])


def test_baselines_are_never_dropped_when_the_uaps_have_no_size(setup, monkeypatch):
    """UAPs that stayed at zero set no budget: asking for baselines is then an error, not a
    matrix without them."""
    from uap.perturbation import Perturbation

    models, x_craft, x_eval, y_eval = setup
    monkeypatch.setattr(uap.universal, "craft", lambda model, x, **kwargs: Perturbation(v=torch.zeros(3, 8, 8)))
    with pytest.raises(ValueError, match="norm 0, so there is no budget"):
        transfer_matrix(models, x_craft, x_eval, y_eval, baselines="random", **SETTINGS)
    none = transfer_matrix(models, x_craft, x_eval, y_eval, baselines="none", **SETTINGS)
    assert none.report.perturbations == ["lin", "probe"] and "baseline_norm" not in none.report.meta


def test_diagonal_is_each_uaps_own_heldout_fooling_rate(setup, result):
    models, _, x_eval, _ = setup
    r = result.report
    for i, name in enumerate(["lin", "probe"]):
        v = result.crafted[name].v
        own = fooling_rate(models[name], x_eval, v)  # the engine's own metric
        with torch.no_grad():  # and an explicit recomputation
            clean = models[name](x_eval).argmax(1)
            pert = models[name]((x_eval + v).clamp(0, 1)).argmax(1)
        # the engine averages in float32: equal up to far less than one image (1/12)
        assert r.fooling_rate[i, i] == pytest.approx(own, abs=1e-6)
        assert r.fooling_rate[i, i] == pytest.approx(result.crafted[name].heldout_fooling_rate, abs=1e-6)
        assert r.fooling_rate[i, i] == pytest.approx((clean != pert).double().mean().item(), abs=1e-12)
    assert r.fooling_rate[:2].diagonal().max() > 0, "the crafted UAPs must fool their source model"
    # off-diagonal cells: UAP crafted on one model applied to the other
    with torch.no_grad():
        v = result.crafted["lin"].v
        probe = models["probe"]
        ref = (probe(x_eval).argmax(1) != probe((x_eval + v).clamp(0, 1)).argmax(1)).double().mean().item()
    assert r.fooling_rate[0, 1] == pytest.approx(ref, abs=1e-12)


def test_crafted_uaps_respect_the_budget_and_baseline_rows_match_their_norm(result):
    r = result.report
    crafted = [result.perturbations[n] for n in ("lin", "probe")]
    assert all(v.abs().max() <= EPS + 1e-6 for v in crafted)
    largest = max(v.abs().max().item() for v in crafted)
    assert r.meta["baseline_norm"] == pytest.approx(largest, rel=1e-6)
    for row in BASELINE_ROWS:
        assert result.perturbations[row].abs().max().item() == pytest.approx(largest, rel=1e-6), row
        assert r.norm_linf[r.perturbations.index(row)] == pytest.approx(largest, rel=1e-6)


def test_resume_reuses_saved_perturbations(setup, tmp_path, monkeypatch):
    models, x_craft, x_eval, y_eval = setup
    first = transfer_matrix(models, x_craft, x_eval, y_eval, out_dir=tmp_path, **SETTINGS)
    saved = sorted(p.name for p in (tmp_path / "perturbations").iterdir())
    assert "lin.settings.json" in saved and "probe.settings.json" in saved
    assert not [n for n in saved if ".tmp" in n]

    def no_crafting(*args, **kwargs):
        raise AssertionError("should have reused the saved perturbation")

    monkeypatch.setattr(uap.universal, "craft", no_crafting)
    again = transfer_matrix(models, x_craft, x_eval, y_eval, out_dir=tmp_path, **SETTINGS)
    assert again.reused == ["lin", "probe"]
    assert again.report == first.report
    for name in ("lin", "probe"):
        assert torch.equal(again.perturbations[name], first.perturbations[name])

    # a crafted perturbation whose settings no longer match is crafted again, not reused
    monkeypatch.undo()
    changed = transfer_matrix(models, x_craft, x_eval, y_eval, out_dir=tmp_path, **{**SETTINGS, "eps": EPS / 2})
    assert changed.reused == []
    # an interrupted save (settings file missing) counts as not crafted
    (tmp_path / "perturbations" / "probe.settings.json").unlink()
    partial = transfer_matrix(models, x_craft, x_eval, y_eval, out_dir=tmp_path, **{**SETTINGS, "eps": EPS / 2})
    assert partial.reused == ["lin"]
    record = json.loads((tmp_path / "perturbations" / "lin.settings.json").read_text())
    assert record["craft"]["eps"] == EPS / 2 and len(record["craft_set_sha256"]) == 64
    assert record["settings"] == {"source": "lin"} and len(record["model_sha256"]) == 64


def test_interrupted_crafting_resumes_from_the_last_pass(setup, tmp_path):
    """Stopping after pass 1 of the second source, then re-running, gives the same UAPs as an
    uninterrupted run: the first source is reused, the second continues from its checkpoint."""
    models, x_craft, x_eval, y_eval = setup
    settings = {**SETTINGS, "max_passes": 3, "delta": 0.05}
    straight = transfer_matrix(models, x_craft, x_eval, y_eval, **settings)
    assert straight.crafted["probe"].passes >= 2, "needs a multi-pass craft to test resuming"

    class Interrupt(Exception):
        pass

    def stop_after_first_pass(event, info):
        if event == "craft_step" and info["model"] == "probe" and info.get("event") == "pass":
            raise Interrupt

    with pytest.raises(Interrupt):
        transfer_matrix(models, x_craft, x_eval, y_eval, out_dir=tmp_path, callback=stop_after_first_pass, **settings)
    folder = tmp_path / "perturbations"
    assert (folder / "probe.partial.safetensors").is_file() and not (folder / "probe.settings.json").exists()

    events = []
    resumed = transfer_matrix(models, x_craft, x_eval, y_eval, out_dir=tmp_path,
                              callback=lambda e, i: events.append((e, i)), **settings)
    assert resumed.reused == ["lin"]
    craft_events = [i for e, i in events if e == "craft"]
    assert [i["model"] for i in craft_events] == ["probe"] and craft_events[0]["resumed_passes"] == 1
    for name in ("lin", "probe"):
        torch.testing.assert_close(resumed.perturbations[name], straight.perturbations[name])
    assert resumed.crafted["probe"].passes == straight.crafted["probe"].passes
    assert not list(folder.glob("probe.partial*")), "checkpoint files are removed once crafting is done"
    assert resumed.report.fooling_rate.tolist() == straight.report.fooling_rate.tolist()


def test_a_source_another_process_is_writing_is_a_clear_error(setup, tmp_path):
    from uap.runs import RunFolder, RunLocked

    models, x_craft, x_eval, y_eval = setup
    with RunFolder(tmp_path / "perturbations", "probe").lock():  # as another process crafting it would
        with pytest.raises(RunLocked, match=r"perturbations is in use.*'probe'"):
            transfer_matrix(models, x_craft, x_eval, y_eval, out_dir=tmp_path, **SETTINGS)
    assert (tmp_path / "perturbations" / "lin.settings.json").is_file(), "sources before it are kept"
    again = transfer_matrix(models, x_craft, x_eval, y_eval, out_dir=tmp_path, **SETTINGS)
    assert again.reused == ["lin"]


def test_fingerprints_cover_every_state_tensor():
    from torch import nn

    from uap.runs import model_fingerprint, tensor_fingerprint

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))  # has a 0-dim int64 buffer
    before = model_fingerprint(net)
    assert before == model_fingerprint(net)
    net[1].num_batches_tracked += 1
    assert model_fingerprint(net) != before
    assert tensor_fingerprint(torch.zeros(2, 3)) != tensor_fingerprint(torch.zeros(3, 2))
    assert tensor_fingerprint(torch.zeros(2)) != tensor_fingerprint(torch.zeros(2, dtype=torch.float64))


def test_retrained_model_is_not_reused(setup, tmp_path):
    models, x_craft, x_eval, y_eval = setup
    transfer_matrix({"lin": models["lin"]}, x_craft, x_eval, out_dir=tmp_path, **SETTINGS)
    other = {"lin": LinearTarget(seed=5)}  # same name, different weights
    again = transfer_matrix(other, x_craft, x_eval, out_dir=tmp_path, **SETTINGS)
    assert again.reused == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sources=["nope"]), "not among the models"),
        (dict(models={"random": LinearTarget()}), "reserved"),
        (dict(models={"chessboard2": LinearTarget()}), "reserved"),
        (dict(baselines="random,stripes"), "unknown baseline 'stripes'"),
        (dict(same_sets=True), "held-out"),
        (dict(eps=-1.0), "eps"),
        (dict(norm="l7"), "norm"),
        (dict(craft_kwargs={"heldout": None}), "craft_kwargs"),
    ],
)
def test_bad_input_is_a_clear_value_error(setup, kwargs, match):
    models, x_craft, x_eval, _ = setup
    models = kwargs.pop("models", models)
    if kwargs.pop("same_sets", False):
        x_eval = x_craft
    with pytest.raises(ValueError, match=match):
        transfer_matrix(models, x_craft, x_eval, **{**SETTINGS, **kwargs})
