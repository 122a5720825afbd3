"""Turn an encoder into a classifier the engine can attack: linear probe and weighted kNN.

Used by the zoo (``models``, which re-exports this module as ``models.probes``) and by the
``hub:DIR:ENTRY`` adapter (:mod:`uap.adapters.hub`), whose backbones get a probe fitted on
labelled images the user names.

Both follow the standard SSL evaluation protocols:

- **linear probe** — a linear layer trained on frozen features of the un-augmented training
  set (Chen et al. 2020, SimCLR §4 "linear evaluation protocol"). Features are standardised
  while fitting, and the standardisation is folded into the layer, so the shipped probe is a
  plain ``nn.Linear`` on raw features.
- **weighted kNN** — Wu et al. 2018 (instance discrimination) as used by DINO §4.1: cosine
  similarity to a bank of L2-normalised training features, the top ``k = 200`` neighbours
  vote with weight ``exp(sim / T)``, ``T = 0.1``.

:class:`ProbedClassifier` and :class:`KNNClassifier` take images in [0, 1] and return logits,
and expose ``.encoder``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from uap.forward import batches, model_device

__all__ = [
    "extract_features", "knn_predict", "knn_accuracy", "train_linear_probe",
    "ProbedClassifier", "KNNClassifier", "KNNHead", "accuracy",
]


@torch.no_grad()
def extract_features(encoder: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Features of ``x`` (images in [0, 1]) in eval mode, computed in batches."""
    was_training = encoder.training
    encoder.eval()
    device = model_device(encoder)
    try:  # x may be a uap.images.Images set: converted to floats one batch at a time
        return torch.cat([encoder(xb.to(device)) for xb in batches(x, batch_size)])
    finally:
        encoder.train(was_training)


def knn_predict(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                k: int = 200, temperature: float = 0.1, chunk: int = 1000) -> torch.Tensor:
    """Class scores (N×C, each row sums to 1) of a similarity-weighted kNN vote.

    ``query`` and ``bank`` are feature matrices (L2-normalised here); each of the ``k`` most
    cosine-similar bank entries adds ``exp(sim / temperature)`` to its class.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if len(bank) != len(bank_labels):
        raise ValueError(f"bank has {len(bank)} features but {len(bank_labels)} labels")
    k = min(k, len(bank))
    bank = F.normalize(bank, dim=1)
    out = []
    for i in range(0, len(query), chunk):
        sim = F.normalize(query[i:i + chunk], dim=1) @ bank.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(sim), num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, bank_labels[top_idx], weights)
        out.append(votes / votes.sum(1, keepdim=True))
    return torch.cat(out)


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1]."""
    return (scores.argmax(1) == labels).float().mean().item()


def knn_accuracy(encoder: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, num_classes: int = 10, k: int = 200, temperature: float = 0.1) -> float:
    """Weighted-kNN top-1 accuracy of ``encoder`` with the training images as the bank."""
    bank = extract_features(encoder, train_x)
    query = extract_features(encoder, test_x)
    return accuracy(knn_predict(query, bank, train_y, num_classes, k, temperature), test_y)


def train_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = 100,
                       batch_size: int = 1024, lr: float = 1e-2, weight_decay: float = 1e-4,
                       seed: int = 0) -> nn.Linear:
    """Fit a linear classifier on frozen ``features`` with cross-entropy (AdamW, cosine lr).

    Returns an ``nn.Linear`` that applies to *raw* features: the per-dimension standardisation
    used during fitting is folded into its weight and bias.
    """
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError("features must be N×D with one label per row")
    g = torch.Generator().manual_seed(seed)
    mu, sigma = features.mean(0), features.std(0).clamp_min(1e-6)
    z = (features - mu) / sigma
    layer = nn.Linear(features.shape[1], num_classes)
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(z) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(len(z), generator=g)
            for i in range(0, len(z), batch_size):
                idx = perm[i:i + batch_size]
                loss = F.cross_entropy(layer(z[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    probe = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():  # W z + b with z = (f - mu) / sigma  ==  (W / sigma) f + (b - W mu / sigma)
        probe.weight.copy_(layer.weight / sigma)
        probe.bias.copy_(layer.bias - (layer.weight / sigma) @ mu)
    return probe


class ProbedClassifier(nn.Module):
    """``head(encoder(x))``: images in [0, 1] → logits; ``.encoder`` gives the features."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class KNNClassifier(nn.Module):
    """Weighted kNN over a feature bank built at construction time; returns log class scores
    as logits (``log`` of the normalised vote, floored at 1e-8 so it stays finite)."""

    def __init__(self, encoder: nn.Module, bank_x: torch.Tensor, bank_y: torch.Tensor, num_classes: int,
                 k: int = 200, temperature: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.num_classes, self.k, self.temperature = num_classes, k, temperature
        self.register_buffer("bank", F.normalize(extract_features(encoder, bank_x), dim=1))
        self.register_buffer("bank_labels", bank_y.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = knn_predict(self.encoder(x), self.bank, self.bank_labels, self.num_classes, self.k, self.temperature)
        return scores.clamp_min(1e-8).log()


class KNNHead(nn.Module):
    """The weighted kNN vote of :func:`knn_predict` as a head on features: N×D features →
    log class scores (floored at 1e-8), over a bank of training features kept as buffers."""

    def __init__(self, bank: torch.Tensor, bank_y: torch.Tensor, num_classes: int, k: int = 200,
                 temperature: float = 0.1):
        super().__init__()
        self.num_classes, self.k, self.temperature = num_classes, k, temperature
        self.register_buffer("bank", F.normalize(bank.float(), dim=1))
        self.register_buffer("bank_labels", bank_y.clone())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        scores = knn_predict(features, self.bank, self.bank_labels, self.num_classes, self.k, self.temperature)
        return scores.clamp_min(1e-8).log()
