"""Backbones for 32×32 images: a CIFAR ResNet-18 with a width multiplier and a small ViT.

Both take images in ``[0, 1]`` (N×3×H×W), normalise them internally (the repo-wide
contract: normalisation lives inside the model) and return a feature vector per image;
``.out_dim`` is its length. Heads, projectors and probes are added on top by the methods.

- :func:`resnet18_cifar` — He et al., "Deep Residual Learning" (CVPR 2016), with the CIFAR
  stem used by SimCLR/MoCo CIFAR experiments: a 3×3 stride-1 first convolution and no
  max-pool, so a 32×32 image keeps 32×32 resolution in the first stage. ``width`` is the
  channel count of the first stage (64 in the paper); ``width=16`` has ~0.7 M parameters.
- :func:`vit_small_cifar` — Dosovitskiy et al., "An Image is Worth 16×16 Words" (ICLR 2021)
  with 4×4 patches (64 tokens for CIFAR). Attention calls
  :func:`torch.nn.functional.scaled_dot_product_attention`; stochastic depth (Huang et al.
  2016) skips the dropped samples' residual branch entirely rather than computing and
  masking it, which saves compute in proportion to the drop rate.
  :meth:`VisionTransformer.forward_packed` runs several crops of each image (DINO's
  multi-crop) as one packed sequence per image, one pass through the blocks for all of them
  (:mod:`models.packing`).
- :func:`vit_tiny_cifar` — the same ViT at half the width (dim 96, 3 heads of 32): about a
  quarter of :func:`vit_small_cifar`'s parameters, e.g. a student to distil a ``vit_small``
  teacher into (:mod:`models.methods.dino_distill`).
- ``vig`` (:mod:`models.vig`) — Han et al., "Vision GNN: An Image is Worth Graph of Nodes" (NeurIPS
  2022), isotropic ViG at CIFAR size: a convolutional stem turns each 4×4 patch into a node
  (64 nodes, learned position embedding), then blocks of a Grapher (the k-nearest-neighbour
  graph of the current node features, rebuilt every block, and a max-relative graph
  convolution, :mod:`models.graph`) and an FFN, each a residual branch; features are the mean
  over nodes. Only the position embedding tells the blocks where a patch was: the graph
  layers themselves are permutation equivariant.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.packing import PACKED_ATTENTION, block_diagonal_mask, segment_attention

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "Normalize", "BasicBlock", "ResNetCIFAR", "resnet18_cifar",
    "VisionTransformer", "vit_small_cifar", "vit_tiny_cifar",
    "node_batch_norm", "NodeLinear", "Grapher", "NodeFFN", "VisionGNN", "vig_cifar",
    "build_backbone", "BACKBONES",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with mean/std stored as buffers (saved with weights)."""

    def __init__(self, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD):
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError("mean and std need the same length and std must be > 0")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


# --------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection (1×1 projection when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNetCIFAR(nn.Module):
    """ResNet with a CIFAR stem; returns globally average-pooled features of size ``out_dim``."""

    def __init__(self, blocks: Sequence[int] = (2, 2, 2, 2), width: int = 64,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be a positive channel count, got {width}")
        self.normalize = Normalize(mean, std)
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        stages, c_in = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            layers = [BasicBlock(c_in, c_out, stride=1 if i == 0 else 2)]
            layers += [BasicBlock(c_out, c_out) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.out_dim = c_in
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each block: every block starts as identity
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(self.normalize(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def resnet18_cifar(width: int = 16, **kwargs) -> ResNetCIFAR:
    """CIFAR ResNet-18 (blocks 2-2-2-2, 3×3 stem, no max-pool); features of size ``8 * width``."""
    return ResNetCIFAR((2, 2, 2, 2), width=width, **kwargs)


# --------------------------------------------------------------------------- ViT


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (fused kernel).

    ``causal=True`` lets position ``t`` attend to positions ``≤ t`` only (text transformer).
    ``forward(x, mask)`` takes an optional boolean T×T mask instead (``True`` = may attend),
    shared by every sequence and head: the block-diagonal mask of packed crops; or
    ``forward(x, segments=lengths)`` attends within consecutive segments of the token axis
    without a mask (:func:`models.packing.segment_attention`).
    """

    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                segments: Sequence[int] | None = None) -> torch.Tensor:
        if (mask is not None or segments is not None) and self.causal:
            raise ValueError("causal attention builds its own mask; pass neither mask nor segments")
        if mask is not None and segments is not None:
            raise ValueError("pass a mask or segments, not both")
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if segments is not None:
            out = segment_attention(q, k, v, segments)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block with per-sample stochastic depth on both residual branches.

    In training, each sample's branch is kept with probability ``1 - drop_path``; the branch
    is evaluated only on the kept samples (``index_add``) and scaled by ``1 / (1 - p)``, so
    dropped samples cost nothing. In eval the branch always runs, unscaled. A sample is one
    sequence: in a packed batch (``mask`` or ``segments`` given, passed to the attention) all the crops packed
    into a sequence are kept or dropped together.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = drop_path

    def _residual(self, x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor],
                  norm: nn.Module) -> torch.Tensor:
        if not self.training or self.drop_path == 0.0:
            return x + branch(norm(x))
        keep = torch.rand(x.shape[0], device=x.device) >= self.drop_path
        idx = keep.nonzero().squeeze(1)
        if idx.numel() == 0:
            return x
        update = branch(norm(x.index_select(0, idx))) / (1.0 - self.drop_path)
        # Under autocast the branch may come back in a lower precision than the residual stream.
        return x.index_add(0, idx, update.to(x.dtype))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                segments: Sequence[int] | None = None) -> torch.Tensor:
        x = self._residual(x, lambda h: self.attn(h, mask, segments), self.norm1)
        return self._residual(x, self.mlp, self.norm2)


class VisionTransformer(nn.Module):
    """ViT on patches of ``patch``×``patch`` pixels; returns the final [CLS] token (``out_dim = dim``).

    Any image size that is a multiple of ``patch`` works (position embeddings are resized);
    :meth:`forward_packed` encodes several crops of each image in one pass."""

    def __init__(self, image_size: int = 32, patch: int = 4, dim: int = 192, depth: int = 6, heads: int = 3,
                 mlp_ratio: float = 4.0, drop_path: float = 0.1,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
        self.normalize = Normalize(mean, std)
        self.patch = patch
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (image_size // patch) ** 2, dim))
        rates = torch.linspace(0, drop_path, depth).tolist()  # deeper blocks drop more (DeiT)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, r) for r in rates])
        self.norm = nn.LayerNorm(dim)
        self.out_dim = dim
        #: how :meth:`forward_packed` keeps crops apart by default (``models.packing.PACKED_ATTENTION``)
        self.packed_attention = "segments"
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings, bicubically resized for a grid other than the training one
        (DINO's local crops are smaller than the global ones)."""
        cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        side = int(grid.shape[1] ** 0.5)
        if (h, w) == (side, side):
            return self.pos_embed
        grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid.flatten(2).transpose(1, 2)], dim=1)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The input sequences of images ``x`` (N×3×H×W in [0, 1]): normalised, patch-embedded,
        a [CLS] token in front, position embeddings for their grid added; N×(1 + HW/p²)×dim."""
        tokens = self.patch_embed(self.normalize(x))
        h, w = tokens.shape[-2:]
        tokens = tokens.flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + self._pos_embed(h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self._tokens(x)))[:, 0]

    def forward_packed(self, crops: Sequence[torch.Tensor], tokens: bool = False,
                       attention: str | None = None) -> list[torch.Tensor]:
        """Encode several crops of the same N images in one pass through the blocks.

        ``crops`` holds N×3×hᵢ×wᵢ batches (one N, any sizes that are multiples of ``patch``,
        e.g. DINO's 2 global and k local crops). Each crop is tokenised as in :meth:`forward`
        (its own [CLS], its own resized position embeddings); image n's crops are concatenated
        into one sequence of L = Σᵢ (1 + hᵢwᵢ/p²) tokens, and each crop attends only to itself,
        so every crop's output is the one :meth:`forward` gives it alone (up to rounding), while
        the linear layers of every block run once over all crops instead of once per resolution.
        ``attention`` (default: the module's ``packed_attention``) says how the crops are kept
        apart: ``"segments"`` runs SDPA within each crop (:func:`models.packing.segment_attention`,
        Σᵢ Tᵢ² scores), ``"mask"`` runs it once over the L×L matrix with a block-diagonal mask
        (:func:`models.packing.block_diagonal_mask`, L² scores). Stochastic depth drops per
        sequence: all the crops of an image together.

        Returns one tensor per crop, in order: its final [CLS] feature (N×dim), or with
        ``tokens=True`` all its final tokens, [CLS] first (N×(1 + hᵢwᵢ/p²)×dim)."""
        attention = self.packed_attention if attention is None else attention
        if attention not in PACKED_ATTENTION:
            raise ValueError(f"attention must be one of {PACKED_ATTENTION}, got {attention!r}")
        if not crops:
            raise ValueError("forward_packed needs at least one crop")
        if len({len(c) for c in crops}) != 1:
            raise ValueError(f"every crop needs the same batch size, got {[len(c) for c in crops]}")
        sequences = [self._tokens(c) for c in crops]
        lengths = [s.shape[1] for s in sequences]
        x = torch.cat(sequences, dim=1)
        if attention == "mask":
            keep_apart = {"mask": block_diagonal_mask(lengths, device=x.device)}
        else:
            keep_apart = {"segments": lengths}
        for block in self.blocks:
            x = block(x, **keep_apart)
        parts = self.norm(x).split(lengths, dim=1)
        return list(parts) if tokens else [p[:, 0] for p in parts]


def vit_small_cifar(dim: int = 192, depth: int = 6, heads: int = 3, patch: int = 4,
                    drop_path: float = 0.1, **kwargs) -> VisionTransformer:
    """A small ViT for 32×32 images (patch 4 → 64 tokens + [CLS]); ~2.7 M parameters by default."""
    return VisionTransformer(patch=patch, dim=dim, depth=depth, heads=heads, drop_path=drop_path, **kwargs)


def vit_tiny_cifar(dim: int = 96, depth: int = 6, heads: int = 3, patch: int = 4,
                   drop_path: float = 0.1, **kwargs) -> VisionTransformer:
    """:func:`vit_small_cifar` at half the width (patch 4, 6 blocks, 3 heads of 32 channels);
    682 272 parameters by default (``vit_small``: 2 691 648), about a quarter."""
    return VisionTransformer(patch=patch, dim=dim, depth=depth, heads=heads, drop_path=drop_path, **kwargs)


def _vig(**kwargs) -> nn.Module:
    from models.vig import vig_cifar  # that module builds on this one's Normalize

    return vig_cifar(**kwargs)


def _airbench(width: int = 64) -> nn.Module:
    from models.airbench import airbench_net  # that module builds on this one's Normalize

    return airbench_net(width)


BACKBONES = {"resnet18": resnet18_cifar, "vit_small": vit_small_cifar, "vit_tiny": vit_tiny_cifar,
             "vig": _vig, "airbench": _airbench}


def build_backbone(name: str, width: int = 16) -> nn.Module:
    """Build a backbone by name (``resnet18`` with ``width``, ``vit_small``, ``vit_tiny``, ``vig``, or ``airbench``
    with ``width`` channels in its first block: :mod:`models.airbench`).

    The module records its arguments in ``.spec`` (``{"backbone": name, "width": width}``),
    so a model that wraps it can write a card that rebuilds it."""
    if name == "resnet18":
        net: nn.Module = resnet18_cifar(width=width)
    elif name == "vit_small":
        net = vit_small_cifar()
    elif name == "vit_tiny":
        net = vit_tiny_cifar()
    elif name == "vig":
        net = _vig()
    elif name == "airbench":
        net = _airbench(width)
    else:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    net.spec = {"backbone": name, "width": width}
    return net
