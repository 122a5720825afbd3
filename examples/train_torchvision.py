"""Train a torchvision ResNet-18 on CIFAR-10 (32×32) on the CPU, for ``torchvision:resnet18 --weights``.

The network is torchvision's ``resnet18(num_classes=10)`` unchanged (ImageNet stem: at 32×32
its last feature map is 1×1, which costs accuracy but keeps the architecture the adapter
builds), trained inside the same wrapper the adapter puts around it —
:class:`uap.adapters.base.AdaptedClassifier` with the normalisation of torchvision's ResNet-18
weights — so the saved state dict, loaded back with ``--model torchvision:resnet18 --weights
r18.pth``, is exactly the trained classifier on images in [0, 1]. The script ends by loading
the file through that path and measuring test accuracy.

    python examples/train_torchvision.py --epochs 5 --out r18.pth
    uap craft --model torchvision:resnet18 --weights r18.pth --data cifar10 --n-images 1000 --eps 10/255 \\
              --method sgd --max-passes 5 --out runs/r18-sgd

Plain SGD with momentum 0.9, cosine learning rate, weight decay 5e-4, random crops (4-pixel
padding) and horizontal flips.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import uap
from uap.adapters.base import AdaptedClassifier
from uap.atomic import atomic_write
from uap.targets import resolve_model


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32×32 crops of the 4-pixel zero-padded images, half of them flipped."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy, dx = torch.randint(0, 9, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, 3, h, w + 8)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, 3, h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--n-train", type=int, default=None, help="class-balanced subset of the 50 000 training images")
    ap.add_argument("--n-test", type=int, default=10000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", type=Path, default=Path("r18.pth"))
    args = ap.parse_args(argv)
    import torchvision

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    net = torchvision.models.resnet18(num_classes=10)
    model = AdaptedClassifier(net, mean=t.mean, std=t.std, resize=32, crop=32, interpolation="bilinear",
                              fixed_size=False)
    x, y, _ = uap.data.load("cifar10", "train", n=args.n_train, seed=args.seed, root=args.data_root)
    steps = args.epochs * math.ceil(len(x) / args.batch_size)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm, total, correct, seen = torch.randperm(len(x), generator=g), 0.0, 0, 0
        for i in range(0, len(x), args.batch_size):
            idx = perm[i:i + args.batch_size]
            logits = model(augment(x[idx], g))
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
            seen += len(idx)
        print(f"epoch {epoch}/{args.epochs}  loss {total / seen:.4f}  train acc {correct / seen:.3f}  "
              f"wall {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    atomic_write(args.out, lambda tmp: torch.save(net.state_dict(), tmp))
    # the file as a user loads it: torchvision:resnet18 --weights FILE
    loaded, _ = resolve_model("torchvision:resnet18", weights=args.out)
    tx, ty, _ = uap.data.load("cifar10", "test", n=args.n_test, seed=args.seed, root=args.data_root)
    print(f"wrote {args.out}: test accuracy {uap.accuracy(loaded, tx, ty):.4f} on {len(ty)} images "
          "(loaded back as torchvision:resnet18)")


if __name__ == "__main__":
    main()
