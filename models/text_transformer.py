"""The text tower of CLIP: a causal transformer whose ``<eot>`` feature embeds the sentence.

Radford et al. 2021, §2.4: token + learned position embeddings, a stack of pre-norm
transformer blocks with *masked* (causal) self-attention, a final LayerNorm, and the
activation at the end-of-text token taken as the feature of the whole caption. The causal
mask means position ``t`` only sees tokens ``≤ t``: the padding after ``<eot>`` never changes
the sentence feature, and (tested) changing a later token leaves earlier positions unchanged.
The paper's text encoder is 12 layers × 512 wide × 8 heads; the default here is far smaller
because the CIFAR-10 caption language has a few dozen words.
"""
from __future__ import annotations

import torch
from torch import nn

from models.backbones import Attention

__all__ = ["CausalSelfAttention", "TextBlock", "TextTransformer"]


class CausalSelfAttention(Attention):
    """Multi-head self-attention where position ``t`` attends to positions ``≤ t`` only
    (the ViT's :class:`models.backbones.Attention` with the causal mask)."""

    def __init__(self, width: int, heads: int):
        super().__init__(width, heads, causal=True)


class TextBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """Causal transformer over token ids; ``forward(ids, eot_index)`` → N×width sentence features.

    Args:
        vocab_size: number of token ids (the tokenizer's vocabulary, specials included).
        context_length: maximum sequence length (size of the position embedding).
        width: model width (paper: 512).
        layers: number of blocks (paper: 12).
        heads: attention heads (paper: 8).
    """

    def __init__(self, vocab_size: int, context_length: int = 32, width: int = 128, layers: int = 3,
                 heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        if min(vocab_size, context_length, width, layers, heads) < 1:
            raise ValueError("vocab_size, context_length, width, layers and heads must all be >= 1")
        self.context_length = context_length
        self.width = width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.Sequential(*[TextBlock(width, heads, mlp_ratio) for _ in range(layers)])
        self.ln_final = nn.LayerNorm(width)
        self._init(layers)

    def _init(self, layers: int) -> None:
        """CLIP's initialisation: small embeddings, residual projections scaled by depth."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std = self.width ** -0.5
        proj_std = attn_std * (2 * layers) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp[0].weight, std=(2 * self.width) ** -0.5)
            nn.init.normal_(block.mlp[2].weight, std=proj_std)
            for lin in (block.attn.qkv, block.attn.proj, block.mlp[0], block.mlp[2]):
                nn.init.zeros_(lin.bias)

    def token_features(self, ids: torch.Tensor) -> torch.Tensor:
        """Features of every position (N×L×width) after the final LayerNorm."""
        if ids.ndim != 2:
            raise ValueError(f"token ids must be N×L, got shape {tuple(ids.shape)}")
        if ids.shape[1] > self.context_length:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds context_length {self.context_length}")
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        return self.ln_final(self.blocks(x))

    def forward(self, ids: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """Sentence features: the ``<eot>`` position's feature of each row (N×width)."""
        features = self.token_features(ids)
        return features[torch.arange(len(ids), device=ids.device), eot_index]

