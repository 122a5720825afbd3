"""``uap.sweep``: budget curves are the runs they claim to be, resume, and name the crossings."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

import uap
from tests.eval_models import EncoderTarget, images
from uap.baselines import strongest_baseline
from uap.sweep import Sweep, SweepPoint, sweep, sweep_points

GRID = dict(methods=("sgd", "deepfool-batched"), n_images=(4, 8), eps=(0.1, 0.25), n_base=8, eps_base=0.25,
            passes=3, delta=0.05, seed=0, batch_size=5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = EncoderTarget(seed=1)
    x, _ = images(n=10, seed=10)
    held = images(n=12, seed=11)
    out = tmp_path_factory.mktemp("sweep")
    return model, x, held, out, sweep(model, x, held, out, **GRID)


def test_points_are_distinct_and_start_with_the_base_point():
    pts = sweep_points(["a", "b"], [4, 8], [0.1, 0.25], n_base=8, eps_base=0.25)
    assert pts[0] == SweepPoint("a", 8, 0.25) and len(pts) == len(set(pts)) == 2 * 3


def test_each_point_equals_a_plain_craft_on_its_nested_subset(setup):
    model, x, held, out, result = setup
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    row = next(r for r in result.rows if r["axis"] == "n_images" and r["value"] == 4 and r["method"] == "sgd")
    plain = uap.craft(model, x[order[:4]], eps=0.25, norm="inf", delta=0.05, max_passes=3, method="sgd", seed=0,
                      heldout=held, batch_size=5)
    assert row["heldout_fooling_rate"] == plain.heldout_fooling_rate
    assert row["fooling_rate"] == plain.fooling_rate


def test_passes_axis_is_the_base_runs_history(setup):
    _, _, _, out, result = setup
    saved = json.loads((out / "points" / "sgd-n8-eps0.25" / "summary.json").read_text())
    curve = result.curve("sgd", "passes")
    assert [v for v, _ in curve] == [1, 2, 3]
    hist = saved["history"]
    assert [r for _, r in curve] == [hist[min(i, len(hist) - 1)]["heldout_fooling_rate"] for i in range(3)]


def test_baseline_is_the_strongest_data_free_baseline_at_each_eps(setup):
    model, _, held, _, result = setup
    for eps in (0.1, 0.25):
        expected = strongest_baseline(model, held[0], eps, "inf", y=held[1])
        assert result.baseline_at(eps) == expected["fooling_rate"]
        assert result.baselines[eps]["name"] == expected["name"]


def test_crossings_follow_the_rows(setup):
    result = setup[4]
    for method, axes in result.crossings.items():
        for axis, value in axes.items():
            rows = sorted((r for r in result.rows if r["method"] == method and r["axis"] == axis),
                          key=lambda r: r["value"])
            above = [r["value"] for r in rows if r["heldout_fooling_rate"] >= result.baseline_at(r["eps"])]
            assert value == (above[0] if above else None)
    # a constructed sweep: a method above the baseline only from |X| = 8
    rows = [{"axis": "n_images", "value": n, "method": "m", "eps": 0.1, "heldout_fooling_rate": r}
            for n, r in ((4, 0.2), (8, 0.6))]
    made = Sweep(rows=rows, baselines={0.1: {"name": "chessboard2", "heldout_fooling_rate": 0.5}})
    assert made.crossings["m"] == {"n_images": 8, "eps": None, "passes": None, "seconds": None}


def test_the_time_axis_is_the_base_runs_cumulative_seconds(setup):
    """``seconds``: one row per finished pass of the base run, at its cumulative wall time,
    with that pass's held-out rate (the passes axis's value)."""
    result = setup[4]
    for method in result.methods:
        passes = [r for r in result.rows if r["method"] == method and r["axis"] == "passes"]
        timed = sorted((r for r in result.rows if r["method"] == method and r["axis"] == "seconds"),
                       key=lambda r: r["passes"])
        assert timed and [r["value"] for r in timed] == sorted(r["value"] for r in timed)
        assert all(r["value"] > 0 for r in timed)
        by_pass = {r["passes"]: r["heldout_fooling_rate"] for r in passes}
        assert all(by_pass[r["passes"]] == r["heldout_fooling_rate"] for r in timed)


def test_n_limits_stop_a_methods_curve_and_craft_nothing_beyond(tmp_path):
    model = EncoderTarget(seed=1)
    x, _ = images(n=10, seed=10)
    out = tmp_path / "limited"
    grid = {**GRID, "n_images": (4, 8, 10)}
    result = sweep(model, x, images(n=6, seed=11), out, **grid, n_limits={"deepfool-batched": 8})
    assert [v for v, _ in result.curve("deepfool-batched", "n_images")] == [4, 8]
    assert [v for v, _ in result.curve("sgd", "n_images")] == [4, 8, 10]
    assert not (out / "points" / "deepfool-batched-n10-eps0.25").exists()
    with pytest.raises(ValueError, match="n_base"):
        sweep(model, x, images(n=6, seed=11), tmp_path / "bad", **grid, n_limits={"sgd": 4})
    with pytest.raises(ValueError, match="not one of"):
        sweep(model, x, images(n=6, seed=11), tmp_path / "bad", **grid, n_limits={"feature": 8})


def test_a_second_sweep_reuses_every_point(setup, monkeypatch):
    model, x, held, out, result = setup
    monkeypatch.setattr(uap.universal, "craft", lambda *a, **k: pytest.fail("a finished point was recrafted"))
    again = sweep(model, x, held, out, **GRID)
    assert again.rows == result.rows


def test_saved_files(setup):
    _, _, _, out, result = setup
    written = result.save(out)
    data = json.loads(written["json"].read_text())
    assert data["crossings"] == json.loads(json.dumps(result.crossings))
    rows = list(csv.DictReader(written["csv"].open()))
    assert len(rows) == len(result.rows) and {r["axis"] for r in rows} == {"n_images", "eps", "passes", "seconds"}
    assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("change, words", [
    (dict(methods=("nope",)), "nope"),
    (dict(n_images=(0,)), "positive integers"),
    (dict(n_images=(100,)), "needs 100 crafting images"),
    (dict(eps=(-1,)), "eps"),
])
def test_bad_grids_fail_before_any_work(tmp_path, change, words):
    model = EncoderTarget(seed=1)
    x, _ = images(n=10, seed=10)
    with pytest.raises(ValueError, match=words):
        sweep(model, x, images(n=4, seed=11), tmp_path / "s", **{**GRID, **change})
    assert not (tmp_path / "s").exists()


def test_cli_sweep_writes_the_curves(tmp_path):
    from cli import app

    out = tmp_path / "cli-sweep"
    args = ["sweep", "--model", "tests.eval_models:encoder_target", "--data", f"imagefolder:{_folder(tmp_path)}",
            "--methods", "sgd", "--n-images", "4,8", "--eps", "0.1,0.25", "--n-base", "8", "--eps-base", "0.25",
            "--passes", "2", "--heldout", "4", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "reaches the strongest baseline" in res.output
    assert {p.name for p in out.iterdir()} >= {"points", "sweep.json", "sweep.csv", "sweep.png"}
    bad = CliRunner().invoke(app, args[:-2] + ["--n-images", "4,x", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--n-images" in bad.output and not (tmp_path / "bad").exists()


def _folder(tmp_path):
    """An imagefolder of 8×8 images, two classes, enough for both splits."""
    from PIL import Image

    root = tmp_path / "imgs"
    gen = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(40):
            arr = (torch.rand(8, 8, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root
