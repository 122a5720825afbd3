"""Outputs: a perturbation and its metadata are never seen mismatched, and a bad ``--out`` is
refused before any work."""
from __future__ import annotations

import os
import threading

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from uap import Perturbation
from uap.atomic import check_output_folder


def _pert(k: int) -> Perturbation:
    return Perturbation(v=torch.full((3, 4, 4), float(k)), seed=k, history=[{"pass": k}] * (k % 7))


def test_a_concurrent_reader_never_sees_a_tensor_with_another_writes_metadata(tmp_path):
    path = tmp_path / "perturbation.safetensors"
    _pert(0).save(path)
    stop, seen, mismatched, errors = threading.Event(), [0], [], []

    def read() -> None:
        while not stop.is_set():
            try:
                p = Perturbation.load(path)
            except (FileNotFoundError, ValueError) as e:  # never: the pair is replaced, not removed
                errors.append(repr(e))
                continue
            seen[0] += 1
            if int(p.v[0, 0, 0]) != p.seed or len(p.history) != p.seed % 7:
                mismatched.append((float(p.v[0, 0, 0]), p.seed))

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    for k in range(1, 300):
        _pert(k).save(path)
    stop.set()
    for t in readers:
        t.join()
    assert seen[0] > 50 and mismatched == [] and errors == []


def test_the_header_is_trusted_over_a_stale_sidecar(tmp_path):
    path = _pert(3).save(tmp_path / "v.safetensors")
    sidecar = path.with_suffix(".json")
    stale = sidecar.read_text()
    _pert(5).save(path)
    sidecar.write_text(stale)  # a writer stopped between the two renames
    loaded = Perturbation.load(path)
    assert loaded.seed == 5 and int(loaded.v[0, 0, 0]) == 5


def test_check_output_folder(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    assert check_output_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # nothing is created
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_output_folder(tmp_path / "file", "--out")
    with pytest.raises(ValueError, match="file is a file, so it cannot be created"):
        check_output_folder(tmp_path / "file" / "run", "--out")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as root every folder is writable
    with pytest.raises(ValueError, match="not writable by this user"):
        check_output_folder(tmp_path / "new", "--out")


_COMMANDS = {
    "craft": ["craft", "--model", "tests.tiny_models:tiny_linear"],
    "evaluate": ["evaluate", "missing.safetensors", "--models", "tests.tiny_models:tiny_linear"],
    "transfer": ["transfer", "--models", "tests.tiny_models:tiny_linear"],
    "train": ["train", "supervised", "--epochs", "1"],
}


@pytest.mark.parametrize("command", list(_COMMANDS))
@pytest.mark.parametrize("case", ["file", "under-a-file", "unwritable"])
def test_a_bad_out_is_refused_before_any_work(command, case, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    out = {"file": tmp_path / "file", "under-a-file": tmp_path / "file" / "run", "unwritable": tmp_path / "ro" / "run"}[case]
    if case == "unwritable":
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(str(tmp_path)) else real(p, mode))
    # a data root that does not exist: a command that got as far as loading data would say so instead
    args = [*_COMMANDS[command], "--out", str(out)]
    if command != "train":
        args += ["--data-root", str(tmp_path / "no-data")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "--out" in result.output and "Traceback" not in result.output
    assert "cannot use" in result.output
    assert {"file": "is a file", "under-a-file": "cannot be created", "unwritable": "not writable"}[case] in result.output
