"""Shared fixtures: where the test data lives.

Tests that need CIFAR-10 read it from ``$UAP_DATA_DIR`` (CI sets ``../shared/data``); when it
is not there they are skipped with a reason rather than silently passing.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


# Tests use small models, where one intra-op thread is as fast as two and does not fight
# other processes for the cores (set UAP_TEST_THREADS to change it).
torch.set_num_threads(int(os.environ.get("UAP_TEST_THREADS", "1")))


def _data_root() -> Path | None:
    env = os.environ.get("UAP_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data")
    for c in candidates:
        if (c / "cifar10" / "train").is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Folder that contains ``cifar10/``; skips the test when the data is not available."""
    root = _data_root()
    if root is None:
        pytest.skip("CIFAR-10 not found: set UAP_DATA_DIR to the folder containing cifar10/")
    return root


@pytest.fixture(scope="session", autouse=True)
def _data_env(tmp_path_factory):
    """Point UAP_DATA_DIR at the shared data (if found) and never download during tests."""
    root = _data_root()
    old = {k: os.environ.get(k) for k in ("UAP_DATA_DIR", "UAP_NO_DOWNLOAD")}
    if root is not None:
        os.environ["UAP_DATA_DIR"] = str(root)
    os.environ["UAP_NO_DOWNLOAD"] = "1"
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
