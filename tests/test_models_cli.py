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
    if not torch.cuda.is_available():  # clip goes through the same loop and the same check
        for method in ("supervised", "clip"):
            result = runner.invoke(app, ["train", method, "--device", "cuda:0", "--out", str(tmp_path)])
            assert result.exit_code == 2 and "CUDA is not available" in result.output
    assert not any(tmp_path.iterdir())  # nothing written


def test_train_clip_rejects_unknown_or_mistyped_hparams_in_one_line(tmp_path):
    result = runner.invoke(app, ["train", "clip", "-H", "depth=3", "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "unknown option(s) ['depth'] for training method 'clip'" in result.output
    assert "known: embed_dim, text_width, text_layers, text_heads, word_dropout, val_size" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["train", "clip", "-H", "val_size=many", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "option val_size for training method 'clip' must be an integer, got 'many'" in result.output
    result = runner.invoke(app, ["train", "simclr", "-H", "temp=0.1", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "known: temperature, proj_dim, hidden_dim" in result.output
    assert not any(tmp_path.iterdir())
