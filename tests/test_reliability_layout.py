"""Memory layout: channels-last only where oneDNN computes it right (narrow strided 1×1
convolutions crash or give wrong weight gradients in it), and training the shape that crashed."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from models.backbones import resnet18_cifar
from uap.forward import BatchLayout, Inference, channels_last_suitable, memory_format_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("width, suitable", [(4, False), (8, False), (16, True), (32, True)])
def test_narrow_resnets_stay_contiguous_on_the_cpu(width, suitable):
    model = resnet18_cifar(width=width)  # its shortcuts are strided 1×1 convolutions of width, 2·width … channels
    assert channels_last_suitable(model) is suitable
    expected = torch.channels_last if suitable else torch.contiguous_format
    assert memory_format_for(model, "cpu") == expected
    assert memory_format_for(model, "cuda") == torch.channels_last  # cuDNN has no such kernel
    assert BatchLayout(torch.device("cpu"), model).channels_last is suitable
    assert Inference(model.eval()).layout.channels_last is suitable


def test_the_rule_looks_at_strided_pointwise_convolutions_only():
    assert channels_last_suitable(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)))
    assert channels_last_suitable(nn.Conv2d(3, 4, 3, stride=2))  # a 3×3 stem is fine at any width
    assert channels_last_suitable(nn.Conv2d(4, 8, 1))  # unit stride: no reduce-to-unit-stride workspace
    assert not channels_last_suitable(nn.Conv2d(8, 16, 1, stride=2))
    assert channels_last_suitable(nn.Conv2d(16, 32, 1, stride=2))


_TRAIN_WIDTH_4 = textwrap.dedent("""
    import sys, torch
    from models.train import TrainConfig, train
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    config = TrainConfig(method="supervised", width=4, epochs=1, batch_size=16, knn_every=0,
                         threads=int(sys.argv[1]), seed=0)
    method, state = train(config, sys.argv[2], data=(x, y), max_steps=3)
    assert state["step"] == 3
    assert all(torch.isfinite(p).all() for p in method.parameters())
    print("trained", next(m for m in method.modules() if isinstance(m, torch.nn.Conv2d)).weight.is_contiguous())
""")


@pytest.mark.parametrize("threads", [1, 2])
def test_training_width_4_does_not_crash_with_avx2_kernels(tmp_path, threads):
    """The report's shape: resnet18_cifar(width=4) crashed in backward (1 thread: segfault; 2: a
    hang) with oneDNN limited to AVX2 and the model in channels-last. In a subprocess, so a crash
    is a failure of this test, not of the suite."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _TRAIN_WIDTH_4, str(threads), str(tmp_path / "run")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trained True" in done.stdout  # the weights stayed contiguous
