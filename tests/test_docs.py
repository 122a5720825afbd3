"""The examples in docs/architecture.md run as written (in a fresh interpreter, in order)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def test_architecture_examples_run():
    blocks = python_blocks(ROOT / "docs" / "architecture.md")
    assert len(blocks) == 6  # a new method, its use, a new baseline, a new model source, a new training method, its use
    method_lines = blocks[0].strip().splitlines()
    assert len(method_lines) <= 20, len(method_lines)
    baseline_lines = blocks[2].strip().splitlines()
    defining = baseline_lines[:next(i for i, line in enumerate(baseline_lines) if line.startswith("assert"))]
    assert len([line for line in defining if line.strip()]) <= 10, defining  # the import and the class
    done = subprocess.run([sys.executable, "-c", "\n".join(blocks) + "\nprint('examples ran')"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "examples ran" in done.stdout
