"""Plain reference loops for the projected-ascent methods (``sgd``, ``sga``, ``cos-uap``).

Written from the papers' pseudo-code, one minibatch at a time, with each loss spelled out per
image and no library helper beyond the visiting order (the driver's contract) and the seeded
random draw of a random start. The tests run the library and these loops side by side, update
for update.
"""
from __future__ import annotations

import math

import torch

import uap
from uap.universal import visiting_order


def pass_generator(seed: int, k: int) -> torch.Generator:
    """The generator :func:`uap.craft` hands pass ``k`` (its documented per-pass seed)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + k + 7919)


def direction(g: torch.Tensor, p: float) -> torch.Tensor:
    """ℓ∞: the sign; ℓ2: the unit vector along ``g``."""
    if math.isinf(p):
        return g.sign()
    n = g.norm()
    return g / n if n > 0 else g * 0


def project(v: torch.Tensor, eps: float, p: float) -> torch.Tensor:
    """The ℓ∞ clamp or the ℓ2 rescaling onto the ball."""
    if math.isinf(p):
        return v.clamp(-eps, eps)
    n = v.norm()
    return v * (eps / n) if n > eps else v


def image_loss(z: torch.Tensor, y: int, loss: str, beta: float, target: int | None) -> torch.Tensor:
    """One image's loss to maximise, from its logits ``z`` (``y``: its clean class)."""
    def rivals(c: int) -> torch.Tensor:
        return torch.cat([z[:c], z[c + 1:]]).max()

    if target is None:
        ce, logit, cw = torch.logsumexp(z, 0) - z[y], -z[y], rivals(y) - z[y]
        return {"ce": torch.minimum(ce, torch.tensor(beta)), "logit": logit,
                "cw": torch.minimum(cw, torch.tensor(beta))}[loss]
    t = target
    return {"ce": -(torch.logsumexp(z, 0) - z[t]), "logit": z[t],
            "cw": torch.minimum(z[t] - rivals(t), torch.tensor(beta))}[loss]


def loss_gradient(model, x: torch.Tensor, clean: torch.Tensor, v: torch.Tensor, *, loss: str = "ce",
                  beta: float = 10.0, target: int | None = None) -> torch.Tensor:
    """``∇_v mean_i loss(f(clip(x_i + v)))``."""
    v = v.clone().requires_grad_(True)
    z = model((x + v).clamp(0, 1))
    value = torch.stack([image_loss(z[i], int(clean[i]), loss, beta, target) for i in range(len(x))]).mean()
    return torch.autograd.grad(value, v)[0]


def cosine_gradient(model, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``∇_v mean_i −cos(f(x_i), f(clip(x_i + v)))``."""
    v = v.clone().requires_grad_(True)
    with torch.no_grad():
        a = model(x)
    b = model((x + v).clamp(0, 1))
    value = torch.stack([-(a[i] @ b[i]) / (a[i].norm() * b[i].norm()) for i in range(len(x))]).mean()
    return torch.autograd.grad(value, v)[0]


def clean_predictions(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def reference_sgd(model, x, *, eps, p, passes, seed, batch_size=32, step_size=0.1, decay=0.7, beta=10.0,
                  loss="ce", target=None):
    """SGD-UAP (Shafahi et al., Algorithm 1) with the step schedule of ``uap.craft``."""
    clean, v = clean_predictions(model, x), torch.zeros(x.shape[1:])
    for k in range(1, passes + 1):
        order, alpha = visiting_order(len(x), seed, k), step_size * eps * decay ** (k - 1)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            g = loss_gradient(model, x[idx], clean[idx], v, loss=loss, beta=beta, target=target)
            v = project(v + alpha * direction(g, p), eps, p)
    return v


def reference_sga(model, x, *, eps, p, passes, seed, batch_size=250, inner_batch_size=10, inner_steps=4,
                  inner_step_size=0.1, step_size=0.1, decay=1.0, momentum=0.0, beta=9.0, loss="ce", target=None):
    """SGA (Liu et al., ICCV 2023): per minibatch, ``inner_steps`` rounds of inner sign steps on a
    copy of ``v`` over its inner minibatches in a fresh random order, then one step along the
    sum of the inner gradients (through the momentum buffer, which each pass starts at zero)."""
    clean, v = clean_predictions(model, x), torch.zeros(x.shape[1:])
    updates = []
    for k in range(1, passes + 1):
        order, gen = visiting_order(len(x), seed, k), pass_generator(seed, k)
        alpha = step_size * eps * decay ** (k - 1)
        inner_alpha = inner_step_size * eps * decay ** (k - 1)
        buffer, n = torch.zeros_like(v), 0
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            w, total = v.clone(), torch.zeros_like(v)
            for _ in range(inner_steps):
                shuffled = idx[torch.randperm(len(idx), generator=gen)]
                for s in range(0, len(shuffled), inner_batch_size):
                    part = shuffled[s:s + inner_batch_size]
                    g = loss_gradient(model, x[part], clean[part], w, loss=loss, beta=beta, target=target)
                    total = total + g
                    w = project(w + inner_alpha * direction(g, p), eps, p)
            if momentum > 0:
                buffer = momentum * buffer + total / total.abs().sum()
                total = buffer
            v = project(v + alpha * direction(total, p), eps, p)
            n += 1
        updates.append(n)
    return v, updates


def reference_cos_uap(model, x, *, eps, p, passes, seed, batch_size=32, step_size=0.1, decay=0.7, init=0.25):
    """Cos-UAP (Zhang et al., ICCV 2021): ascent on −cos between clean and perturbed logits,
    from a random start of size ``init·ε`` drawn from the pass's generator when ``v`` is zero."""
    v = torch.zeros(x.shape[1:])
    for k in range(1, passes + 1):
        order, gen = visiting_order(len(x), seed, k), pass_generator(seed, k)
        if not bool(v.any()):
            draw = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
            v = project(uap.random_perturbation(tuple(v.shape), init * eps, p, seed=draw), eps, p)
        alpha = step_size * eps * decay ** (k - 1)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            v = project(v + alpha * direction(cosine_gradient(model, x[idx], v), p), eps, p)
    return v
