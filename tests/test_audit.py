"""``uap.audit`` and ``uap audit``: the protocol's rows are the independent measurements, the
worst case is their extreme, runs are reused, and bad input is one line."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import uap
from uap.audit import PROTOCOLS, Attack, Protocol, audit


class _Encoded(nn.Module):
    """A classifier with an ``.encoder`` (what the label-free feature attack needs)."""

    def __init__(self, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = features, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def _cnn(seed: int, encoder: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    head = nn.Linear(32, 4)
    return (_Encoded(features, head) if encoder else nn.Sequential(features, head)).eval()


TINY = Protocol("tiny", "0", (Attack("sgd", "sgd", 2), Attack("feature", "feature", 1, needs_encoder=True)),
                "random,chessboard2", "two attacks for tests")


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(16, 3, 16, 16, generator=g), torch.rand(20, 3, 16, 16, generator=g), torch.randint(0, 4, (20,), generator=g)


def test_rows_are_the_independent_measurements(images, tmp_path):
    xc, xe, ye = images
    models = {"plain": _cnn(0), "enc": _cnn(1, encoder=True)}
    result = audit(models, xc, xe, ye, eps=0.2, protocol=TINY, out_dir=tmp_path, batch_size=7)
    assert [r["attack"] for r in result.rows("plain")] == ["sgd", "random", "chessboard2"]  # feature needs an encoder
    assert [r["attack"] for r in result.rows("enc")] == ["sgd", "feature", "random", "chessboard2"]
    for name, model in models.items():
        for row in result.rows(name):
            v = result.perturbations[name][row["attack"]]
            assert float(v.abs().max()) <= 0.2 + 1e-6
            assert row["fooling_rate"] == pytest.approx(uap.fooling_rate(model, xe, v))
            assert row["accuracy"] == pytest.approx(uap.accuracy(model, xe, ye, v))
            assert row["fooling_rate_low"] <= row["fooling_rate"] <= row["fooling_rate_high"]
        worst = result.worst(name)
        assert worst["fooling_rate"] == max(r["fooling_rate"] for r in result.rows(name))
        assert worst["accuracy"] == min(r["accuracy"] for r in result.rows(name))
    written = result.save(tmp_path / "x")
    saved = json.loads((tmp_path / "x" / "audit.json").read_text())
    assert saved["protocol"]["name"] == "tiny" and saved["protocol"]["version"] == "0"
    assert saved["protocol"]["attacks"]["sgd"]["max_passes"] == 2
    assert saved["models"]["enc"]["worst"]["fooling_rate"] == result.worst("enc")["fooling_rate"]
    assert {p.name for p in written} == {"audit.json", "audit.csv", "audit.png"}


def test_a_second_audit_reuses_every_run(images, tmp_path):
    xc, xe, ye = images
    first = audit({"m": _cnn(2)}, xc, xe, ye, eps=0.2, protocol=TINY, out_dir=tmp_path)
    events = []
    again = audit({"m": _cnn(2)}, xc, xe, ye, eps=0.2, protocol=TINY, out_dir=tmp_path,
                  callback=lambda event, info: events.append((event, info.get("event"))))
    assert ("craft_step", "reused") in events and ("craft_step", "pass") not in events
    torch.testing.assert_close(again.perturbations["m"]["sgd"], first.perturbations["m"]["sgd"], rtol=0, atol=0)
    assert again.rows("m") == first.rows("m")


def test_protocols_are_versioned_and_bad_input_is_one_error(images):
    xc, xe, _ = images
    assert {"standard", "quick"} <= set(PROTOCOLS) and all(p.version for p in PROTOCOLS.values())
    assert "Fourier" in PROTOCOLS["standard"].description and "no Fourier" in PROTOCOLS["quick"].description
    with pytest.raises(ValueError, match="unknown audit protocol"):
        audit([_cnn(0)], xc, xe, eps=0.1, protocol="strongest")
    with pytest.raises(ValueError, match="held-out"):
        audit([_cnn(0)], xc, xc, eps=0.1, protocol=TINY)


def test_cli_audit(tmp_path, monkeypatch):
    from cli import app

    monkeypatch.setattr("uap.audit.PROTOCOLS", {**PROTOCOLS, "quick": TINY})
    runner = CliRunner()
    result = runner.invoke(app, ["audit", "--models", "supervised", "--quick", "--n-craft", "16", "--n-images", "24",
                                 "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "worst case" in result.output and "tiny v0" in result.output
    saved = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert saved["meta"]["n_eval"] == 24 and saved["meta"]["norm"] == "inf"
    assert math.isclose(saved["meta"]["eps"], 10 / 255)
    bad = runner.invoke(app, ["audit", "--models", "supervised", "--eps", "-1", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "error:" in bad.output and "Traceback" not in bad.output
