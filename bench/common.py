"""What every benchmark shares: argument parsing, model and data loading, timing, output."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from rich.console import Console
from rich.table import Table

from uap import data
from uap.targets import resolve_model

console = Console(width=150)


def base_parser(description: str) -> argparse.ArgumentParser:
    """Options shared by every benchmark: model, data, sizes, seed, threads, output file."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="supervised", help="zoo name or package.module:factory")
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch intra-op threads (all contenders run with the same number)")
    ap.add_argument("--out", default=None, help="JSON file for the results (default runs/bench/<name>.json)")
    return ap


def parse_eps(text: str) -> float:
    """``8/255`` → 0.0313…; plain numbers pass through."""
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


def parse_norm(text: str) -> float:
    t = text.lower().lstrip("l")
    return math.inf if t in ("inf", "infinity") else float(t)


def setup(args: argparse.Namespace) -> torch.nn.Module:
    """Seed, set threads, and resolve the model (eval mode, no parameter gradients)."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model, _ = resolve_model(args.model)
    return model


def load_images(args: argparse.Namespace, split: str, n: int,
                model: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of ``split``, prepared for ``model`` (its declared resize + crop, for an
    ``imagefolder:`` dataset of photographs of any size)."""
    prep = data.Preprocessing.choose(args.data, [model] if model is not None else [])
    x, y, _ = data.load(args.data, split=split, n=n, seed=args.seed, root=args.data_root, preprocessing=prep)
    return x, y


@contextmanager
def timer() -> Iterator[dict]:
    """``with timer() as t: …`` then ``t["seconds"]``."""
    out: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - start


def machine() -> dict[str, Any]:
    """The facts that a reader needs to compare numbers across runs."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def write_results(name: str, args: argparse.Namespace, results: dict[str, Any]) -> Path:
    """Write ``{"args", "machine", "results"}`` as JSON, atomically."""
    path = Path(args.out or f"runs/bench/{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "args": vars(args), "machine": machine(), "results": results}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float))
    os.replace(tmp, path)
    console.print(f"results written to {path}")
    return path


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if c != columns[0] else "left")
    for r in rows:
        table.add_row(*[fmt(v) for v in r])
    console.print(table)


def fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
