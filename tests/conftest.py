"""Shared fixtures: where the test data lives, and CI's rule for skipped tests.

Tests that need CIFAR-10 (or the ImageNet sample) read it from ``$UAP_DATA_DIR`` (CI sets
``../shared/data``); when it is not there they are skipped with a reason rather than silently
passing. Under ``UAP_CI_NO_SKIPS=1`` (``.ci/run``) such a skip fails the run: only a test that
needs a GPU may skip there (:mod:`tests.skip_policy`).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# pytester runs the skip rule's own tests; skip_policy is that rule (active under UAP_CI_NO_SKIPS=1).
pytest_plugins = ["pytester", "tests.skip_policy"]


# Tests use small models, where one intra-op thread is as fast as two and does not fight
# other processes for the cores (set UAP_TEST_THREADS to change it).
TEST_THREADS = int(os.environ.get("UAP_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)


def _data_folders() -> list[Path]:
    """Where shared data sets may be: ``$UAP_DATA_DIR``, then the checkout's ``../shared/data``."""
    env = os.environ.get("UAP_DATA_DIR")
    return [*([Path(env)] if env else []), REPO.parent / "shared" / "data"]


def _data_root() -> Path | None:
    return next((c for c in _data_folders() if (c / "cifar10" / "train").is_dir()), None)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Folder that contains ``cifar10/``; skips the test when the data is not available."""
    root = _data_root()
    if root is None:
        pytest.skip("CIFAR-10 not found: set UAP_DATA_DIR to the folder containing cifar10/")
    return root


@pytest.fixture(scope="session")
def imagenet_sample_if_present() -> Path | None:
    """The ImageNet sample folder (``imagenet-sample/``, with ``val/``), or None when not found."""
    return next((c / "imagenet-sample" for c in _data_folders() if (c / "imagenet-sample" / "val").is_dir()), None)


@pytest.fixture(scope="session")
def imagenet_sample(imagenet_sample_if_present) -> Path:
    """The ImageNet sample folder; skips the test when it is not available."""
    if imagenet_sample_if_present is None:
        pytest.skip("the ImageNet sample not found: set UAP_DATA_DIR to the folder containing imagenet-sample/")
    return imagenet_sample_if_present


@pytest.fixture(autouse=True)
def _restore_threads():
    """Put torch's intra-op thread count back to the suite's after every test, so that a test
    that changes it (or runs ``--threads N`` in process) does not change it for the next ones."""
    yield
    if torch.get_num_threads() != TEST_THREADS:
        torch.set_num_threads(TEST_THREADS)


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
