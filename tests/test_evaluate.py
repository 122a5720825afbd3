"""``uap.evaluate`` against a direct, one-image-at-a-time computation written here."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from tests.eval_models import DetachedEncoderTarget, EncoderTarget, LinearTarget, images
from uap.evaluate import clean_outputs, evaluate, perturbed_outputs
from uap.forward import Inference
from uap.report import Report


def _direct(v: torch.Tensor, model, x, y):
    """Reference metrics from an explicit loop over single images (the slow, obvious way)."""
    clean, pert, cos = [], [], []
    with torch.no_grad():
        for xi in x:
            xi = xi.unsqueeze(0)
            xp = torch.clamp(xi + v, 0, 1)
            clean.append(int(model(xi).argmax()))
            pert.append(int(model(xp).argmax()))
            if hasattr(model, "encoder"):
                a, b = model.encoder(xi).flatten(), model.encoder(xp).flatten()
                cos.append(float(a.double() @ b.double() / (a.double().norm() * b.double().norm())))
    n = len(x)
    counts = Counter(pert)
    top = max(counts.values())
    return {
        "fooling_rate": sum(c != p for c, p in zip(clean, pert)) / n,
        "clean_accuracy": sum(c == int(t) for c, t in zip(clean, y)) / n,
        "accuracy": sum(p == int(t) for p, t in zip(pert, y)) / n,
        "dominant_share": top / n,
        "dominant_labels": {k for k, c in counts.items() if c == top},
        "embedding_cosine": sum(cos) / n if cos else math.nan,
    }


@pytest.fixture(scope="module")
def setup():
    x, y = images(n=13, seed=3)
    models = {"linear": LinearTarget(seed=0), "probe": EncoderTarget(seed=1), "detached": DetachedEncoderTarget(seed=2)}
    gen = torch.Generator().manual_seed(7)
    perts = {
        "big": (torch.rand(3, 8, 8, generator=gen) * 2 - 1) * 0.6,  # large enough to fool and to clip
        "small": (torch.rand(3, 8, 8, generator=gen) * 2 - 1) * 0.05,
        "zero": torch.zeros(3, 8, 8),
    }
    return x, y, models, perts


def test_report_equals_direct_computation(setup):
    x, y, models, perts = setup
    # batch_size 5 does not divide 13: the last, short batch must count too
    report = evaluate(perts, models, x, y, batch_size=5)
    assert report.perturbations == list(perts) and report.models == list(models)
    assert report.n_images == 13
    saw_fooling = False
    for i, (pname, v) in enumerate(perts.items()):
        for j, (mname, model) in enumerate(models.items()):
            ref = _direct(v, model, x, y)
            c = report.cell(pname, mname)
            assert c["fooling_rate"] == pytest.approx(ref["fooling_rate"], abs=1e-12), (pname, mname)
            assert c["clean_accuracy"] == pytest.approx(ref["clean_accuracy"], abs=1e-12)
            assert c["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
            assert c["dominant_share"] == pytest.approx(ref["dominant_share"], abs=1e-12)
            assert c["dominant_label"] in ref["dominant_labels"]
            if math.isnan(ref["embedding_cosine"]):
                assert math.isnan(c["embedding_cosine"])
            else:
                assert c["embedding_cosine"] == pytest.approx(ref["embedding_cosine"], abs=1e-5)
            saw_fooling |= ref["fooling_rate"] > 0
    assert saw_fooling, "test perturbations must fool something, or the fooling-rate check is vacuous"
    # zero perturbation: nothing changes, embeddings identical
    z = report.perturbations.index("zero")
    assert np.all(report.fooling_rate[z] == 0)
    assert np.allclose(report.embedding_cosine[z, 1:], 1.0)
    assert np.allclose(report.accuracy[z], report.clean_accuracy)
    assert report.norm_linf[0] == pytest.approx(float(perts["big"].abs().max()))
    assert report.norm_l2[1] == pytest.approx(float(perts["small"].norm()))


def test_clean_predictions_computed_once_per_model(setup):
    x, y, _, perts = setup

    class Counting(LinearTarget):
        calls = 0

        def forward(self, x):
            Counting.calls += len(x)
            return super().forward(x)

    m = Counting(seed=0)
    first = evaluate(perts, {"m": m}, x, y, batch_size=4)
    # one clean pass + one pass per perturbation, each over all 13 images
    assert Counting.calls == 13 * (1 + len(perts))
    # same model, same images: the clean predictions come from the engine's cache
    Counting.calls = 0
    again = evaluate(perts, {"m": m}, x, y, batch_size=4)
    assert Counting.calls == 13 * len(perts)
    assert again == first
    # a changed model invalidates the cache (no stale clean predictions)
    with torch.no_grad():
        m.fc.bias.add_(1.0)
    Counting.calls = 0
    evaluate(perts, {"m": m}, x, y, batch_size=4)
    assert Counting.calls == 13 * (1 + len(perts))


def test_encoder_runs_once_per_image_when_the_probe_calls_it(setup):
    """The forward hook captures the perturbed embedding; the encoder is not run twice."""
    x, y, _, perts = setup
    probe = EncoderTarget(seed=1)
    seen = []
    probe.encoder.register_forward_hook(lambda _m, i, _o: seen.append(len(i[0])))
    evaluate(perts, {"p": probe}, x, y, batch_size=5)
    n, first_batch = 13, 5
    # clean: model (cached labels) + encoder; then per perturbation one pass, plus one
    # verification call on the very first perturbed batch
    assert sum(seen) == 2 * n + len(perts) * n + first_batch


def test_hook_and_direct_encoder_paths_agree(setup):
    """The probe's embedding is taken from a hook; the detached one by calling .encoder."""
    x, _, _, _ = setup
    v = torch.full((3, 8, 8), 0.1)
    for model in (EncoderTarget(seed=1), DetachedEncoderTarget(seed=2)):
        out = clean_outputs(model, x, batch_size=4)
        pert, _ = perturbed_outputs(Inference(model, embeddings=True), x, v, batch_size=4)
        with torch.no_grad():
            torch.testing.assert_close(out.embeddings, model.encoder(x))
            torch.testing.assert_close(out.predictions, model(x).argmax(1))
            xp = (x + v).clamp(0, 1)
            torch.testing.assert_close(pert.embeddings, model.encoder(xp))
            torch.testing.assert_close(pert.predictions, model(xp).argmax(1))


def test_without_labels_accuracies_are_nan(setup):
    x, _, models, perts = setup
    report = evaluate([perts["big"]], [models["linear"]], x)
    assert report.perturbations == ["v0"] and report.models == ["m0"]
    assert math.isnan(report.accuracy[0, 0]) and math.isnan(report.clean_accuracy[0])
    assert not math.isnan(report.fooling_rate[0, 0])


def test_sequences_are_named_after_their_source_model(setup):
    from uap.perturbation import Perturbation

    x, _, models, perts = setup
    seq = [Perturbation(v=perts["big"], model="lin"), Perturbation(v=perts["small"], model="lin"), perts["zero"]]
    report = evaluate(seq, models, x)
    assert report.perturbations == ["lin", "lin#2", "v2"]
    assert report.models == ["linear", "probe", "detached"]


def test_restores_training_mode(setup):
    x, y, _, perts = setup
    m = LinearTarget().train()
    evaluate(perts, {"m": m}, x, y)
    assert m.training


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.rand(4, 3, 8, 8) * 2), r"\[0, 1\]"),
        (dict(x=torch.rand(3, 8, 8)), "N×C×H×W"),
        (dict(v=torch.zeros(3, 4, 4)), "shape"),
        (dict(v=torch.full((3, 8, 8), float("nan"))), "NaN"),
        (dict(y=torch.zeros(3, dtype=torch.long)), "one label per image"),
        (dict(batch_size=0), "batch_size"),
        (dict(models={}), "no models"),
        (dict(perts={}), "no perturbations"),
        (dict(models={"bad": lambda t: t}), "nn.Module"),
    ],
)
def test_bad_input_is_a_clear_value_error(kwargs, match):
    x = kwargs.get("x", torch.rand(4, 3, 8, 8))
    perts = kwargs.get("perts", {"v": kwargs.get("v", torch.zeros(3, 8, 8))})
    models = kwargs.get("models", {"m": LinearTarget()})
    with pytest.raises(ValueError, match=match):
        evaluate(perts, models, x, kwargs.get("y"), batch_size=kwargs.get("batch_size", 8))


def test_report_json_and_csv_round_trip(setup, tmp_path):
    x, y, models, perts = setup
    report = evaluate(perts, models, x, y, classes=["a", "b", "c", "d"], meta={"data": "random"})
    back = Report.load_json(report.save_json(tmp_path / "results.json"))
    assert back == report and back.meta == {"data": "random"}
    csv_back = Report.load_csv(report.save_csv(tmp_path / "results.csv"), classes=report.classes)
    assert csv_back == report
    # missing values survive as null / empty, not as the string "nan"
    assert "NaN" not in (tmp_path / "results.json").read_text()
    assert ",nan," not in (tmp_path / "results.csv").read_text().lower()
    # a changed number is noticed (the round-trip test can fail)
    back.fooling_rate[0, 0] += 1e-9
    assert back != report


def test_baseline_rows_follow_the_perturbations_and_are_flagged(setup, tmp_path):
    from uap.baselines import build_baselines

    x, y, models, perts = setup
    x_craft, _ = images(n=10, seed=30)
    built = build_baselines("random,chessboard2,fourier", (3, 8, 8), 0.1, "inf", models={"linear": models["linear"]},
                            x_craft=x_craft)
    report = evaluate(perts, models, x, y, baselines=built.perturbations)
    assert report.perturbations == [*perts, "random", "chessboard2", "fourier:linear"]
    assert report.baselines == ["random", "chessboard2", "fourier:linear"]
    assert report.is_baseline("chessboard2") and not report.is_baseline("big")
    i, j = report.perturbations.index("chessboard2"), report.models.index("linear")
    v = built.perturbations["chessboard2"]
    with torch.no_grad():
        m = models["linear"]
        expected = (m(x).argmax(1) != m((x + v).clamp(0, 1)).argmax(1)).double().mean().item()
    assert report.fooling_rate[i, j] == pytest.approx(expected, abs=1e-12)
    # the flag survives JSON and CSV, and a report that lost it is a different report
    assert Report.load_json(report.save_json(tmp_path / "r.json")) == report
    csv_text = report.save_csv(tmp_path / "r.csv").read_text()
    assert "baseline" in csv_text.splitlines()[0]
    assert Report.load_csv(tmp_path / "r.csv").baselines == report.baselines
    unflagged = Report.from_dict({**report.to_dict(), "baselines": []})
    assert unflagged != report
    with pytest.raises(ValueError, match="also baseline rows"):
        evaluate(perts, models, x, y, baselines={"big": v})
    with pytest.raises(ValueError, match="not among the perturbations"):
        Report.from_dict({**report.to_dict(), "baselines": ["nope"]})


# ---------------------------------------------------------------------------- baselines built by evaluate

def _saved(v, p, tmp_path, name):
    from uap.perturbation import Perturbation
    from uap.projection import lp_norm

    size = float(lp_norm(v, p))
    pert = Perturbation(v=v, model="linear", eps=size if size > 0 else 0.1, norm=p, method="test", seed=0)
    return pert.save(tmp_path / name)


def test_evaluate_builds_baselines_at_the_perturbations_budget(setup):
    """Names in, rows out: the same rows, numbers and facts as building them by hand at the
    largest norm of the perturbations and passing the rows."""
    from uap.baselines import build_baselines

    x, y, models, perts = setup
    x_craft, _ = images(n=10, seed=30)
    events = []
    report = evaluate(perts, models, x, y, baselines="all", norm="inf", x_craft=x_craft, seed=2, meta={"data": "toy"},
                      progress=lambda done, total, desc: events.append((done, total, desc)))
    budget = max(float(v.abs().max()) for v in perts.values())
    built = build_baselines("all", (3, 8, 8), budget, "inf", seed=2, models=models, x_craft=x_craft)
    by_hand = evaluate(perts, models, x, y, baselines=built.perturbations, meta={"data": "toy"})
    assert report.perturbations == by_hand.perturbations == [*perts, *built.perturbations]
    assert report.baselines == list(built.perturbations) and "fourier:detached" in report.baselines
    for metric in ("fooling_rate", "accuracy", "dominant_share", "embedding_cosine"):
        np.testing.assert_array_equal(getattr(report, metric), getattr(by_hand, metric))
    assert report.meta["data"] == "toy" and report.meta["baseline_norm"] == budget
    assert report.meta["baseline_p"] == "inf" and report.meta["n_craft"] == 10
    assert report.meta["baselines"]["fourier:probe"]["frequency"] == built.info["fourier:probe"]["frequency"]
    # the per-model searches are announced before the passes over the images
    total = len(models) * (len(report.perturbations) + 1)
    assert events[:3] == [(0, total, f"fourier baseline on {m}") for m in models] and events[-1][:2] == (total, total)
    # a Baselines object is rows with facts: they reach the report's meta
    assert evaluate(perts, models, x, y, baselines=built).meta["baselines"] == built.info


def test_the_budget_comes_from_the_perturbations_unless_one_is_given(setup, tmp_path):
    from uap.perturbation import Perturbation

    x, y, models, perts = setup
    linf = Perturbation.load(_saved(perts["small"], "inf", tmp_path, "a"))
    l2 = Perturbation.load(_saved(perts["big"] * 0.1, "2", tmp_path, "b"))
    # Perturbations carry the norm they were crafted in
    report = evaluate({"a": linf}, models, x, baselines="random")
    assert report.meta["baseline_norm"] == float(perts["small"].abs().max()) and report.meta["baseline_p"] == "inf"
    assert report.meta["n_craft"] == 0
    # crafted in different norms: no one budget, unless an explicit one is given
    with pytest.raises(ValueError, match=r"different norms \(2, inf\).*evaluate them separately.*--eps and --norm"):
        evaluate({"a": linf, "b": l2}, models, x, baselines="random")
    mixed = evaluate({"a": linf, "b": l2}, models, x, baselines="random", eps=0.03, norm=2)
    assert mixed.meta["baseline_norm"] == 0.03 and mixed.meta["baseline_p"] == "2"
    assert float(mixed.norm_l2[-1]) == pytest.approx(0.03, rel=1e-6)
    # plain tensors say nothing about their norm: norm= measures them in one
    with pytest.raises(ValueError, match="plain tensors.*give norm"):
        evaluate(perts, models, x, baselines="random")
    assert evaluate(perts, models, x, baselines="random", norm=2).meta["baseline_norm"] == \
        max(float(v.norm()) for v in perts.values())
    # an explicit budget wins over the perturbations' own
    assert evaluate({"a": linf}, models, x, baselines="random", eps=0.2).meta["baseline_norm"] == 0.2


def test_a_requested_baseline_is_never_dropped(setup, tmp_path):
    x, y, models, perts = setup
    zero = {"zero": perts["zero"]}
    with pytest.raises(ValueError, match=r"every perturbation has ℓinf norm 0.*explicit budget \(eps and norm; "
                                         r"--eps and --norm on the command line\)"):
        evaluate(zero, models, x, baselines="random", norm="inf")
    report = evaluate(zero, models, x, y, baselines="random,chessboard2", eps=0.1, norm="inf")
    assert report.baselines == ["random", "chessboard2"] and report.norm_linf[1:] == pytest.approx([0.1, 0.1])
    # no perturbation at all: the baselines alone, at an explicit budget
    alone = evaluate({}, models, x, y, baselines="chessboard1", eps=0.1)
    assert alone.perturbations == alone.baselines == ["chessboard1"] and alone.meta["baseline_p"] == "inf"
    with pytest.raises(ValueError, match="no perturbations to take the baselines' budget from"):
        evaluate({}, models, x, baselines="random")
    with pytest.raises(ValueError, match="no perturbations to evaluate"):
        evaluate({}, models, x, baselines="none")
    # a baseline that needs crafting images says so, before any pass over the images
    with pytest.raises(ValueError, match=r"the fourier baseline needs crafting images \(x_craft\)"):
        evaluate(perts, models, x, baselines="random,fourier", norm="inf")
    with pytest.raises(ValueError, match="not the held-out images"):
        evaluate(perts, models, x, baselines="fourier", norm="inf", x_craft=x)
    with pytest.raises(ValueError, match="also baseline rows"):
        evaluate({"fourier:linear": perts["big"]}, models, x, baselines="fourier", norm="inf", x_craft=x[:4].clone())
    with pytest.raises(ValueError, match="eps and norm are the budget"):
        evaluate(perts, models, x, baselines={"noise": perts["small"]}, eps=0.1)


def test_load_perturbations_names_each_file_once(setup, tmp_path):
    from uap.saved import load_perturbations

    _, _, _, perts = setup
    (tmp_path / "run-a").mkdir()
    (tmp_path / "other").mkdir()
    files = [_saved(perts["small"], "inf", tmp_path / "run-a", "perturbation"),  # a `uap craft` run
             _saved(perts["big"], "2", tmp_path, "lin"),
             _saved(perts["zero"], "inf", tmp_path / "other", "lin")]
    loaded = load_perturbations([files[0], tmp_path / "lin", files[2], tmp_path / "run-a", str(files[1])])
    assert list(loaded) == ["run-a", "lin", "lin#2", "run-a#2", "lin#3"]
    assert torch.equal(loaded["run-a#2"].v, perts["small"]) and loaded["lin"].norm == "2"
    assert torch.equal(loaded["lin#2"].v, perts["zero"])
    with pytest.raises(FileNotFoundError, match="holds no perturbation.safetensors"):
        load_perturbations([tmp_path / "other"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_perturbations([tmp_path / "nope"])
    with pytest.raises(ValueError, match="no perturbation files"):
        load_perturbations([])
