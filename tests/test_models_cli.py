"""`uap train` / `uap models`: thin CLI over the library, bad input is one line and exit 2."""
from __future__ import annotations

from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def test_models_lists_the_zoo():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    assert "model zoo" in result.output


def test_train_rejects_unknown_method_and_bad_hparam(tmp_path):
    result = runner.invoke(app, ["train", "swav", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown method" in result.output
    result = runner.invoke(app, ["train", "simclr", "-H", "temperature", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output


def test_train_resume_without_checkpoint_is_an_error(tmp_path):
    result = runner.invoke(app, ["train", "supervised", "--resume", "--knn-every", "0", "--n-train", "100",
                                 "--batch-size", "50", "--out", str(tmp_path / "none")])
    assert result.exit_code == 2 and "no checkpoint" in result.output


def test_train_device_is_checked_before_anything_runs(tmp_path):
    import torch

    result = runner.invoke(app, ["train", "supervised", "--device", "tpu", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--device must be" in result.output
    result = runner.invoke(app, ["train", "clip", "--device", "cuda:0", "--out", str(tmp_path)])
    assert result.exit_code == 2
    expected = "CPU only" if torch.cuda.is_available() else "CUDA is not available"
    assert expected in result.output
    assert not any(tmp_path.iterdir())  # nothing written
