"""``--threads``: one option on every command that runs models, and the same v whatever its value."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from uap import Perturbation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--n-images", "12", "--heldout", "0", "--max-passes", "2", "--delta", "0.01", "--eps", "10/255"]


def _craft(out, *args: str):
    result = CliRunner().invoke(app, ["craft", *SMALL, "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return Perturbation.load(out / "perturbation.safetensors")


def test_one_and_two_threads_craft_the_same_v(tmp_path, data_root):
    """The same command with --threads 1 and 2: the same v, bit for bit."""
    runs = [_craft(tmp_path / f"t{n}", "--model", "tests.tiny_models:bn_net", "--method", "sgd", "--threads", str(n),
                   "--data-root", str(data_root)) for n in (1, 2)]
    assert torch.get_num_threads() == 2
    assert torch.equal(runs[0].v, runs[1].v)  # bitwise
    assert [h["fooling_rate"] for h in runs[0].history] == [h["fooling_rate"] for h in runs[1].history]


_LOGITS_1_VS_2_THREADS = textwrap.dedent("""
    import torch, uap
    from tests.tiny_models import bn_net
    model, x = bn_net().eval(), torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        with torch.no_grad():
            out.append(torch.cat([model(x), model(x[:1])]))
    print("equal" if torch.equal(out[0], out[1]) and torch.equal(out[0], out[2]) else "differ", uap.threads.MKL_CBWR)
""")


def test_logits_do_not_depend_on_the_thread_count():
    """bn_net's 16 384-wide linear layer is where MKL splits a sum across threads (its logits
    differed by ~1e-7 between 1 and 2 threads before ``import uap`` asked for strict CNR mode).
    In a fresh process, so MKL reads its setting at its first call."""
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", _LOGITS_1_VS_2_THREADS], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == "equal", done.stdout


@pytest.mark.parametrize("command", ["craft", "evaluate", "transfer", "train"])
def test_every_command_takes_threads_and_refuses_zero(command, tmp_path):
    args = {"craft": ["craft"], "evaluate": ["evaluate", str(tmp_path / "v.safetensors")],
            "transfer": ["transfer"], "train": ["train", "supervised"]}[command]
    result = CliRunner().invoke(app, [*args, "--threads", "0", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "--threads must be ≥ 1" in result.output
    assert "Traceback" not in result.output
