"""``kill -9`` at any point, then ``--resume``: the result of an uninterrupted run, bit for bit;
no half-written file; the lock refuses a second writer and does not outlive a killed one."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.launch import uap_command
from uap import Perturbation

REPO = Path(__file__).resolve().parents[1]
CRAFT = ["craft", "--model", "tests.tiny_models:tiny_cnn", "--n-images", "16", "--heldout", "0", "--max-passes", "3",
         "--delta", "0.001", "--eps", "10/255", "--threads", "1"]
METHODS = {"sgd": ["--method", "sgd", "--batch-size", "8"], "deepfool": ["--method", "deepfool"]}


def _start(args: list[str], pause: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    env.pop("UAP_TEST_WRITE_PAUSE", None)
    if pause:
        env["UAP_TEST_WRITE_PAUSE"] = str(pause)
    return subprocess.Popen([*uap_command(), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    return out


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before the kill: " + proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _temporaries(folder: Path) -> list[Path]:
    return list(folder.glob(".*.tmp"))


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Uninterrupted runs, one per method."""
    root = tmp_path_factory.mktemp("ref")
    procs = {m: _start([*CRAFT, *extra, "--out", str(root / m)]) for m, extra in METHODS.items()}
    for proc in procs.values():
        _finish(proc)
    return {m: Perturbation.load(root / m / "perturbation.safetensors") for m in METHODS}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("when", ["after-first-checkpoint", "inside-a-checkpoint-write"])
def test_craft_killed_then_resumed_equals_an_uninterrupted_run(tmp_path, references, method, when):
    out = tmp_path / "run"
    args = [*CRAFT, *METHODS[method], "--out", str(out)]
    checkpoint = out / "perturbation.partial.safetensors"
    if when == "after-first-checkpoint":
        proc = _start(args, pause=0.3)  # slow writes: the run is still crafting when the checkpoint appears
        _kill_when(proc, checkpoint.is_file)
    else:  # inside the second checkpoint's write: its temporary file is complete, not yet renamed
        proc = _start(args, pause=1.0)
        _kill_when(proc, lambda: checkpoint.is_file() and any(p.name.startswith(".perturbation.partial.")
                                                               for p in _temporaries(out)))
    assert not (out / "perturbation.settings.json").exists()  # not finished, and nothing says it is
    assert (out / "perturbation.lock").exists()  # the killed holder's file is still there …
    _finish(_start([*args, "--resume"]))  # … and blocks nothing
    resumed = Perturbation.load(out / "perturbation.safetensors")
    assert torch.equal(resumed.v, references[method].v)
    assert [h["fooling_rate"] for h in resumed.history] == [h["fooling_rate"] for h in references[method].history]
    assert _temporaries(out) == [] and not checkpoint.exists() and not (out / "perturbation.lock").exists()


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "run"
    first = _start([*CRAFT, *METHODS["sgd"], "--out", str(out)], pause=0.5)
    deadline = time.monotonic() + 120
    while not (out / "perturbation.lock").is_file() or not (out / "perturbation.lock").read_text().strip():
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.01)
    second = _start([*CRAFT, *METHODS["sgd"], "--out", str(out), "--resume"])
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2 and "is in use" in err and f"pid {first.pid}" in err, err
    first.send_signal(signal.SIGKILL)
    first.wait()


TRAIN = ["train", "supervised", "--width", "4", "--epochs", "3", "--batch-size", "16", "--n-train", "64",
         "--knn-every", "0", "--threads", "1"]


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "last.ckpt.safetensors"))


def test_train_killed_inside_a_checkpoint_write_then_resumed_equals_an_uninterrupted_run(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "run"
    reference = _start([*TRAIN, "--out", str(ref)])
    proc = _start([*TRAIN, "--out", str(out)], pause=1.0)
    # inside epoch 2's checkpoint, between its two files: the weights renamed, the state not yet
    _kill_when(proc, lambda: (out / "last.json").is_file() and any(p.name.startswith(".last.json.")
                                                                   for p in _temporaries(out)))
    _finish(_start([*TRAIN, "--out", str(out), "--resume"]))
    _finish(reference)
    expected, got = _weights(ref), _weights(out)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
