"""Helpers for the hostile-input tests: the CLI's error contract, hostile files.

The contract every bad input meets (RELIABILITY.md): exit code 2, exactly one ``error:`` line on
stderr, the last (only ``warning:`` lines the library gave about the input may come before it),
no traceback, no raw control character, and nothing written.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from typer.testing import CliRunner

from cli import app

#: The CLI's test factory: a seeded linear classifier on 3×32×32 images with 10 classes.
MODEL = "tests.tiny_models:tiny_linear"


def invoke(*args: str):
    """``uap ARGS`` in-process (stdout and stderr kept apart where Click allows it)."""
    return CliRunner().invoke(app, list(args))


def stderr_of(result) -> str:
    try:
        return result.stderr
    except ValueError:  # older click mixes the streams
        return result.output


def one_line_error(result) -> str:
    """Assert the contract for a refused command and return its one error line."""
    err = stderr_of(result)
    unexpected = result.exception if not isinstance(result.exception, SystemExit) else None
    assert unexpected is None, f"raised {unexpected!r}"
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(line.startswith("warning: ") for line in lines[:-1]), err
    lines = lines[-1:]
    assert "Traceback" not in err and "\x1b" not in err, err
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears if anything unpickles it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_payloads(folder: Path, marker: Path) -> dict[str, Path]:
    """A payload that would create ``marker``, as weights files in every pickle format torch reads:
    torch's zip format, its legacy (pre-1.6) format, a raw pickle stream, and a raw pickle
    named ``.safetensors``."""
    state = {"weight": Payload(marker)}
    files = {"zip": folder / "evil.pt", "legacy": folder / "evil-legacy.pth", "raw": folder / "evil.pkl",
             "disguised": folder / "evil.safetensors"}
    torch.save(state, files["zip"])
    torch.save(state, files["legacy"], _use_new_zipfile_serialization=False)
    files["raw"].write_bytes(pickle.dumps(state))
    files["disguised"].write_bytes(pickle.dumps(state))
    return files


def damaged_safetensors(folder: Path) -> dict[str, Path]:
    """Random bytes, and a real safetensors file cut in half, both named ``.safetensors``."""
    from safetensors.torch import save_file

    good = folder / "good.safetensors"
    save_file({"weight": torch.zeros(10, 3 * 32 * 32), "bias": torch.zeros(10)}, str(good))
    random_bytes, truncated = folder / "random.safetensors", folder / "truncated.safetensors"
    random_bytes.write_bytes(os.urandom(512))
    raw = good.read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2])
    return {"random": random_bytes, "truncated": truncated}


def rewrite_metadata(path: Path, text: str) -> Path:
    """Give the perturbation file ``path`` the metadata ``text`` (JSON, or not), in its header —
    the copy a reader trusts — and in its ``.json`` sidecar alike."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={"uap": text})
    path.with_suffix(".json").write_text(text)
    return path
