"""The shape the code keeps: dependencies one way, a thin command line, no plug-in named by a caller."""
from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import uap

ROOT = Path(__file__).resolve().parent.parent
CLI_FILES = sorted((ROOT / "cli").glob("*.py"))


def _imported(path: Path) -> set[str]:
    """Top-level package names that ``path`` imports (anywhere in the file, lazily or not)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "uap").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_engine_imports_neither_the_zoo_nor_the_command_line(path):
    assert not _imported(path) & {"cli", "models"}


def test_models_never_import_the_command_line():
    assert not any("cli" in _imported(p) for p in (ROOT / "models").rglob("*.py"))


@pytest.mark.parametrize("path", CLI_FILES, ids=lambda p: p.name)
def test_every_command_line_module_is_short(path):
    assert len(path.read_text(encoding="utf-8").splitlines()) <= 250


def test_the_command_line_names_no_model_source_or_baseline():
    pattern = re.compile(r'"(fourier|torchvision|timm|open_clip|clip)"')
    found = [f"{p.name}:{i}" for p in CLI_FILES for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if pattern.search(line)]
    assert not found


def test_the_crafting_driver_takes_no_method_specific_argument():
    params = inspect.signature(uap.craft).parameters
    assert not [name for name in params if "deepfool" in name.lower()]
    assert {"method", "method_options", "target"} <= set(params)
