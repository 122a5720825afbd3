"""Figures: written as real, non-empty PNGs; the heatmap shows the report's numbers."""
from __future__ import annotations

import math

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from tests.eval_models import EncoderTarget, LinearTarget, images
from uap.plots import amplify, heatmap_figure, plot_examples, plot_heatmap, plot_perturbations, write_figures
from uap.report import Report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _report(nan: bool = False) -> Report:
    fool = np.array([[0.734, 0.1], [0.25, 0.9], [0.02, 0.03]])
    if nan:
        fool[1, 0] = math.nan
    return Report(
        perturbations=["a", "b", "random"], models=["a", "b"], fooling_rate=fool,
        accuracy=np.zeros((3, 2)), dominant_label=np.zeros((3, 2), dtype=int), dominant_share=np.ones((3, 2)),
        embedding_cosine=np.full((3, 2), math.nan), clean_accuracy=[0.5, 0.6],
        norm_linf=[0.03] * 3, norm_l2=[1.0] * 3, n_images=10, classes=["x", "y", "z", "w"], baselines=["random"],
    )


def _assert_png(path, min_side: int = 100):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000
    img = mpimg.imread(path)
    assert min(img.shape[:2]) >= min_side
    assert img.std() > 0.01, "an image of one flat colour"
    assert not list(path.parent.glob(".*.tmp*")), "temporary files left behind"


def test_heatmap_prints_every_cell_value():
    fig = heatmap_figure(_report())
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["73.4", "10.0", "25.0", "90.0", "2.0", "3.0"]
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "random"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]


def test_heatmap_marks_missing_values(tmp_path):
    fig = heatmap_figure(_report(nan=True))
    assert fig.axes[0].texts[2].get_text() == "–"
    _assert_png(plot_heatmap(_report(nan=True), tmp_path / "h.png"))


def test_heatmap_rejects_unknown_metric():
    with pytest.raises(ValueError, match="unknown metric"):
        heatmap_figure(_report(), metric="bogus")


def test_amplify_maps_range_to_unit_interval():
    v = torch.tensor([[[-0.03, 0.0, 0.015, 0.03]]])
    torch.testing.assert_close(amplify(v), torch.tensor([[[0.0, 0.5, 0.75, 1.0]]]))
    assert torch.all(amplify(torch.zeros(1, 2, 2)) == 0.5)


def test_all_figures_are_written(tmp_path):
    x, y = images(n=9)
    gen = torch.Generator().manual_seed(0)
    perts = {"lin": (torch.rand(3, 8, 8, generator=gen) - 0.5) * 0.2, "random": torch.full((3, 8, 8), 0.05)}
    models = {"lin": LinearTarget(0), "enc": EncoderTarget(1)}
    paths = write_figures(tmp_path, _report(), perts, models, x, y=y, k=4)
    assert set(paths) == {"heatmap", "perturbations", "examples"}
    for p in paths.values():
        _assert_png(p)


def test_perturbation_and_example_plots_validate_input(tmp_path):
    x, _ = images(n=3)
    with pytest.raises(ValueError, match="no perturbations"):
        plot_perturbations({}, tmp_path / "p.png")
    with pytest.raises(ValueError, match="no model to label"):
        plot_examples(x, {"v": torch.zeros(3, 8, 8)}, {}, tmp_path / "e.png")


def test_heatmap_sets_baseline_rows_apart():
    fig = heatmap_figure(_report())
    ax = fig.axes[0]
    styles = {t.get_text(): t.get_fontstyle() for t in ax.get_yticklabels()}
    assert styles == {"a": "normal", "b": "normal", "random": "italic"}
    assert [line.get_ydata()[0] for line in ax.get_lines()] == [1.5], "one line above the first baseline row"
    bold = {t.get_text() for t in ax.texts if t.get_fontweight() == "bold"}
    assert bold == {"73.4", "90.0"}, "only a UAP on its own source model is bold"


def test_examples_of_a_per_model_baseline_use_its_models_labels(tmp_path, monkeypatch):
    """A baseline row made for one model is captioned with that model, as its facts in the
    report say (the row's name is not parsed); other rows with their own model or the first."""
    import uap.plots

    x, y = images(n=9)
    models = {"lin": LinearTarget(0), "enc": EncoderTarget(1)}
    rows = ["lin", "searched", "fourier:enc", "random"]
    report = Report(
        perturbations=rows, models=list(models), fooling_rate=np.zeros((4, 2)), accuracy=np.zeros((4, 2)),
        dominant_label=np.zeros((4, 2), dtype=int), dominant_share=np.ones((4, 2)),
        embedding_cosine=np.full((4, 2), math.nan), clean_accuracy=[0.5, 0.6], norm_linf=[0.03] * 4,
        norm_l2=[1.0] * 4, n_images=9, baselines=rows[1:],
        meta={"baselines": {"searched": {"kind": "search", "model": "enc"}, "random": {"kind": "random"}}},
    )
    seen = {}

    def spy(x, perturbations, labelled_by, out, **kwargs):
        seen.update({name: label for name, (label, _) in labelled_by.items()})
        return out

    monkeypatch.setattr(uap.plots, "plot_examples", spy)
    write_figures(tmp_path, report, {r: torch.zeros(3, 8, 8) for r in rows}, models, x, y=y)
    assert seen == {"lin": "lin", "searched": "enc", "fourier:enc": "lin", "random": "lin"}
