"""``precision="bf16"`` only where bfloat16 is native: elsewhere fp32, one warning, and the
result records the precision used."""
from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from typer.testing import CliRunner

import uap
from cli import app
from tests.tiny_models import tiny_cnn
from uap.deepfool import bf16_slow_reason, effective_precision

df_module = importlib.import_module("uap.deepfool")  # uap.deepfool is also the function


@pytest.fixture
def no_native_bf16(monkeypatch):
    """A CPU like the report's (AVX2 only): no AVX512-BF16, no AMX."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    df_module._warn_once.cache_clear()
    yield
    df_module._warn_once.cache_clear()


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)


def test_a_cpu_without_native_bf16_falls_back_with_one_warning(no_native_bf16):
    assert "no native bfloat16" in bf16_slow_reason("cpu")
    with pytest.warns(RuntimeWarning, match="bf16 falls back to fp32"):
        assert effective_precision("bf16", "cpu") == "fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: a second call is silent
        assert effective_precision("bf16", "cpu") == "fp32"
    assert effective_precision("fp32", "cpu") == "fp32"


def test_a_capped_onednn_isa_counts_as_no_bf16(native_bf16, monkeypatch):
    assert bf16_slow_reason("cpu") is None and effective_precision("bf16", "cpu") == "bf16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in bf16_slow_reason("cpu")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert bf16_slow_reason("cpu") is None


def _craft(precision: str):
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return uap.craft(tiny_cnn().eval(), x, eps=10 / 255, method="deepfool-batched", max_passes=1,
                     method_options={"batch_size": 6, "precision": precision})


def test_the_fallback_crafts_the_fp32_result_and_records_it(no_native_bf16):
    with pytest.warns(RuntimeWarning, match="falls back to fp32"):
        fallback = _craft("bf16")
    reference = _craft("fp32")
    assert fallback.extra["deepfool"]["precision"] == "fp32"
    assert torch.equal(fallback.v, reference.v)


def test_native_bf16_is_used_and_recorded(native_bf16):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert _craft("bf16").extra["deepfool"]["precision"] == "bf16"


def test_the_command_line_says_so_in_one_line(no_native_bf16, tmp_path, data_root):
    result = CliRunner().invoke(app, ["craft", "--model", "tests.tiny_models:tiny_cnn", "--n-images", "6", "--heldout",
                                      "0", "--max-passes", "1", "--method", "deepfool-batched", "--batch-size", "6",
                                      "--precision", "bf16", "--out", str(tmp_path / "run"), "--data-root",
                                      str(data_root)])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "falls back to fp32" in line]
    assert len(lines) == 1 and lines[0].startswith("warning:"), result.output
    assert uap.Perturbation.load(tmp_path / "run" / "perturbation.safetensors").extra["deepfool"]["precision"] == "fp32"
