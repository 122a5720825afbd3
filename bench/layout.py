"""Memory-layout benchmark: contiguous vs channels-last, per ResNet width, training and DeepFool.

The measurement behind :func:`uap.forward.channels_last_suitable`: for each width it times
supervised training steps (forward, backward, optimiser step) and DeepFool input-gradient
passes of ``resnet18_cifar(width)`` in both layouts, each configuration in its own process
(channels-last at a narrow width may crash inside oneDNN: that row then says so instead of
ending the benchmark), alternating layouts so that load on the machine affects both alike.

    python -m bench.layout --widths 4,8,16 --batch-size 128 --steps 6 --threads 2
    ONEDNN_MAX_CPU_ISA=AVX2 python -m bench.layout --widths 4,8,16   # an AVX2-only CPU's kernels
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

_ONE = """
import json, sys, time, torch
import torch.nn.functional as F
from models.backbones import resnet18_cifar
width, layout, batch, steps, threads = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads); torch.manual_seed(0)
fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
net = torch.nn.Sequential(resnet18_cifar(width=width), torch.nn.LazyLinear(10))
net(torch.rand(2, 3, 32, 32)); net = net.to(memory_format=fmt)
opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
x, y = torch.rand(batch, 3, 32, 32).contiguous(memory_format=fmt), torch.randint(0, 10, (batch,))
def train_step():
    t0 = time.perf_counter(); loss = F.cross_entropy(net(x), y); opt.zero_grad(); loss.backward(); opt.step()
    return time.perf_counter() - t0
def grad_step():
    net.eval(); xi = x[:16].clone().requires_grad_(True); t0 = time.perf_counter()
    torch.autograd.grad(net(xi)[:, :9].sum(), xi); net.train(); return time.perf_counter() - t0
train_step(); grad_step()
print(json.dumps({"train": [train_step() for _ in range(steps)], "grad": [grad_step() for _ in range(steps)]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="4,8,16")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two layouts per width")
    args = ap.parse_args()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print(f"{'width':>5} {'layout':>14} {'train step ms':>14} {'input grad ms':>14}  note")
    for width in (int(w) for w in args.widths.split(",")):
        times: dict[str, dict[str, list[float]]] = {}
        notes: dict[str, str] = {}
        for _ in range(args.rounds):
            for layout in ("contiguous", "channels_last"):
                if layout in notes:
                    continue
                done = subprocess.run([sys.executable, "-c", _ONE, str(width), layout, str(args.batch_size),
                                       str(args.steps), str(args.threads)], cwd=repo, env=env, capture_output=True,
                                      text=True, timeout=600)
                if done.returncode != 0:
                    notes[layout] = f"failed: exit {done.returncode} {(done.stderr.strip().splitlines() or [''])[-1][:60]}"
                    continue
                run = json.loads(done.stdout.strip().splitlines()[-1])
                for key, values in run.items():
                    times.setdefault(layout, {}).setdefault(key, []).extend(values)
        for layout in ("contiguous", "channels_last"):
            t = times.get(layout)
            cells = [f"{1000 * statistics.median(t[k]):14.1f}" if t else f"{'–':>14}" for k in ("train", "grad")]
            print(f"{width:>5} {layout:>14} {cells[0]} {cells[1]}  {notes.get(layout, '')}")


if __name__ == "__main__":
    main()
