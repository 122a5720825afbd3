"""Generative image–text models built in the repo: CoCa and a SimVLM-style captioner.

**CoCa** (Yu et al., "CoCa: Contrastive Captioners are Image-Text Foundation Models", 2022)::

    tokens   = image_tokens(backbone, images)       # the backbone's last feature map, N×T×C
    img_emb  = pool_1(tokens)                        # attentional pooling, 1 learned query
    context  = pool_n(tokens)                        # n learned queries: what the decoder reads
    h        = unimodal(embed(ids))                  # causal self-attention only, no image
    txt_emb  = h[<eot>]                              # the contrastive text embedding
    logits   = head(multimodal(h, context))          # causal self-attention + cross-attention
    loss     = λ_con · clip_loss(img_emb, txt_emb) + λ_cap · CE(logits[:, :-1], ids[:, 1:])

**SimVLM-style captioner** (Wang et al., "SimVLM: Simple Visual Language Model Pretraining with
Weak Supervision", ICLR 2022): prefix language modelling where the prefix is the image. The
same :class:`Captioner` with ``contrastive=False``, no unimodal layers and
``caption_queries=0`` — every decoder layer cross-attends to *all* image tokens (linearly
mapped to the text width), and the loss is the captioning loss alone.

The image tokens come from the zoo's own backbones (:func:`image_tokens`): the CIFAR ResNet's
last stage (4×4 = 16 tokens), the ViT's final tokens ([CLS] + 64 patches) or airbench's last
group. The text side reuses the CLIP text tower's blocks (:class:`models.text_transformer.TextBlock`),
the word tokenizer and the contrastive loss (:func:`models.clip_loss.clip_loss`).

The captioning loss weighs every caption the same (each caption's mean token negative
log-likelihood, averaged over the batch), so under ``torch.distributed`` a rank's loss is the
mean over its rows and the ranks' share-weighted losses add up to the one-process loss, as
the contrastive part (which gathers negatives across ranks) already does.

Targets for the engine (images in ``[0, 1]`` → logits):

- :class:`CaptionLikelihoodClassifier` — ``logits[n, c]`` is the log-likelihood of class
  ``c``'s prompt caption given image ``n`` (mean over prompt templates), all classes and images
  in one batched decoder pass; it also has ``.generate(images)`` and ``.encoder``.
- :class:`CoCaZeroShotClassifier` — CoCa's contrastive zero-shot head, as CLIP's.

:func:`caption_attack_loss` is the label-free objective of a caption-level UAP: the
captioning loss of the clean greedy captions under the perturbed images.
"""
from __future__ import annotations

import math
import string
from dataclasses import dataclass, fields
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.airbench import AirbenchNet
from models.backbones import ResNetCIFAR, VisionTransformer, build_backbone
from models.captions import TRAIN_TEMPLATES
from models.clip_loss import clip_loss
from models.precision import float32_loss
from models.text_transformer import CausalSelfAttention, TextBlock
from models.tokenizer import WordTokenizer

__all__ = [
    "CaptionerConfig", "Captioner", "image_tokens", "CrossAttention", "AttentionalPooler", "MultimodalBlock",
    "CaptionDecoder", "caption_loss", "caption_log_likelihood", "CLASS_ONLY_TEMPLATES",
]

#: The training templates whose only field is the class (``"a {c}."`` …): the prompts the
#: likelihood classifier scores, captions a captioner has been trained to write.
CLASS_ONLY_TEMPLATES = tuple(
    t for t in TRAIN_TEMPLATES
    if {name for _, name, _, _ in string.Formatter().parse(t) if name is not None} == {"c"})


@dataclass(frozen=True)
class CaptionerConfig:
    """Architecture of a :class:`Captioner` (everything needed to rebuild it from a card).

    Args:
        backbone, width: the image encoder (:func:`models.backbones.build_backbone`).
        context_length: tokens per caption, ``<sot>``/``<eot>`` included.
        text_width, text_heads: the decoder's width and attention heads.
        unimodal_layers: text-only causal layers; their ``<eot>`` output is the text embedding.
        multimodal_layers: causal self-attention + cross-attention layers before the token head.
        caption_queries: learned queries of the decoder's attentional pooler (CoCa); 0 lets the
            decoder attend to every image token instead (SimVLM's image prefix).
        contrastive: whether the model has CoCa's contrastive head (1-query pooler, projections,
            learnable temperature); needs ``unimodal_layers >= 1``.
        embed_dim: size of the joint image–text space (contrastive head only).
        init_temperature, max_logit_scale: τ at initialisation and the clamp on 1/τ, as CLIP's.
    """

    backbone: str = "resnet18"
    width: int = 16
    context_length: int = 16
    text_width: int = 64
    text_heads: int = 4
    unimodal_layers: int = 2
    multimodal_layers: int = 2
    caption_queries: int = 16
    contrastive: bool = True
    embed_dim: int = 128
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0

    def __post_init__(self):
        if min(self.text_width, self.text_heads, self.multimodal_layers, self.width, self.embed_dim) < 1:
            raise ValueError("text_width, text_heads, multimodal_layers, width and embed_dim must be >= 1")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width ({self.text_width}) must be a multiple of text_heads ({self.text_heads})")
        if self.unimodal_layers < 0 or self.caption_queries < 0:
            raise ValueError("unimodal_layers and caption_queries must be >= 0")
        if self.contrastive and self.unimodal_layers < 1:
            raise ValueError("a contrastive captioner needs unimodal_layers >= 1 (its text embedding)")
        if not (self.init_temperature > 0 and 1 / self.init_temperature <= self.max_logit_scale):
            raise ValueError(f"1/init_temperature must be in (0, max_logit_scale={self.max_logit_scale}]")

    @classmethod
    def from_dict(cls, d: dict) -> "CaptionerConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown captioner config keys {sorted(unknown)}")
        return cls(**d)


def image_tokens(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The backbone's last feature map as a sequence of image tokens, N×T×C (C = ``out_dim``).

    CIFAR ResNet: the last stage before global pooling (4×4 → 16 tokens); ViT: the final
    normalised tokens, [CLS] first; airbench: the last group before global max-pooling (scaled
    as its output is). Each is what the backbone pools into its ``forward`` features."""
    if isinstance(backbone, ResNetCIFAR):
        fmap = backbone.stages(backbone.stem(backbone.normalize(images)))
    elif isinstance(backbone, VisionTransformer):
        return backbone.norm(backbone.blocks(backbone._tokens(images)))
    elif isinstance(backbone, AirbenchNet):
        fmap = backbone.groups(F.gelu(backbone.whiten(backbone.normalize(images)))) * backbone.scale
    else:
        raise ValueError(f"no image tokens for a {type(backbone).__name__} backbone "
                         "(supported: resnet18, vit_small, vit_tiny, airbench)")
    return fmap.flatten(2).transpose(1, 2)


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` (N×L×width) to ``context`` (M×T×context_width).

    ``repeats`` > 1 lets each context row serve ``repeats`` consecutive rows of ``x``
    (N = M·repeats): keys and values are projected once per image and shared, which is how the
    likelihood classifier scores every class prompt against one image."""

    def __init__(self, width: int, context_width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(context_width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor, repeats: int = 1) -> torch.Tensor:
        n, length, d = x.shape
        m, t, _ = context.shape
        if n != m * repeats:
            raise ValueError(f"{n} query rows for {m} context rows × {repeats} repeats")
        q = self.q(x).view(n, length, self.heads, d // self.heads).transpose(1, 2)
        k, v = self.kv(context).view(m, t, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if repeats > 1:
            k, v = k.repeat_interleave(repeats, 0), v.repeat_interleave(repeats, 0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, length, d))


class AttentionalPooler(nn.Module):
    """``n`` learned queries cross-attending to the image tokens (CoCa §3.2): N×T×C → N×n×width."""

    def __init__(self, width: int, context_width: int, queries: int, heads: int):
        super().__init__()
        if queries < 1:
            raise ValueError(f"an attentional pooler needs >= 1 query, got {queries}")
        # named *_embedding so the optimiser groups treat it as an embedding (no weight decay)
        self.query_embedding = nn.Parameter(torch.randn(queries, width) * width ** -0.5)
        self.ln_context = nn.LayerNorm(context_width)
        self.attn = CrossAttention(width, context_width, heads)
        self.ln_out = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q = self.query_embedding.expand(len(tokens), -1, -1)
        return self.ln_out(self.attn(q, self.ln_context(tokens)))


class MultimodalBlock(nn.Module):
    """Pre-norm decoder block: causal self-attention, cross-attention to the image, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.cross = CrossAttention(width, width, heads)
        self.ln_3 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, context: torch.Tensor, repeats: int = 1) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.cross(self.ln_2(x), context, repeats)
        return x + self.mlp(self.ln_3(x))


class CaptionDecoder(nn.Module):
    """Token + position embeddings, ``unimodal`` text-only blocks, ``multimodal`` blocks and a
    next-token head. Every self-attention is causal: position ``t`` never sees tokens ``> t``."""

    def __init__(self, vocab_size: int, context_length: int, width: int, heads: int,
                 unimodal_layers: int, multimodal_layers: int):
        super().__init__()
        self.context_length, self.width = context_length, width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.unimodal = nn.Sequential(*[TextBlock(width, heads) for _ in range(unimodal_layers)])
        self.multimodal = nn.ModuleList([MultimodalBlock(width, heads) for _ in range(multimodal_layers)])
        self.ln_final = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        self._init(unimodal_layers + multimodal_layers)

    def _init(self, layers: int) -> None:
        """CLIP's text-tower initialisation: small embeddings, residual projections scaled by depth."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        std, proj_std = self.width ** -0.5, self.width ** -0.5 * (2 * layers) ** -0.5
        for block in [*self.unimodal, *self.multimodal]:
            for lin, s in [(block.attn.qkv, std), (block.attn.proj, proj_std), (block.mlp[0], (2 * self.width) ** -0.5),
                           (block.mlp[2], proj_std)]:
                nn.init.normal_(lin.weight, std=s)
                nn.init.zeros_(lin.bias)
        nn.init.normal_(self.head.weight, std=std)
        nn.init.zeros_(self.head.bias)

    def unimodal_features(self, ids: torch.Tensor) -> torch.Tensor:
        """N×L×width features of the text-only layers (no image involved)."""
        if ids.ndim != 2 or ids.shape[1] > self.context_length:
            raise ValueError(f"token ids must be N×L with L <= {self.context_length}, got shape {tuple(ids.shape)}")
        return self.unimodal(self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]])

    def multimodal_logits(self, h: torch.Tensor, context: torch.Tensor, repeats: int = 1) -> torch.Tensor:
        """Next-token logits (N×L×vocab) from unimodal features ``h`` and the image ``context``."""
        for block in self.multimodal:
            h = block(h, context, repeats)
        return self.head(self.ln_final(h))


def _target_mask(ends: torch.Tensor, length: int) -> torch.Tensor:
    """N×(length−1) mask of the predicted positions: targets 1 … ``ends`` (``<eot>`` included)."""
    return torch.arange(1, length, device=ends.device)[None] <= ends[:, None]


@float32_loss
def caption_log_likelihood(logits: torch.Tensor, ids: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Per-caption log-likelihood Σₜ log p(ids[t] | ids[<t], image) over t = 1 … ``ends``
    (``<eot>`` included, padding excluded). ``logits`` are N×(L−1)×V, predicting ``ids[:, 1:]``."""
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp * _target_mask(ends, ids.shape[1])).sum(1)


@float32_loss
def caption_loss(logits: torch.Tensor, ids: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Teacher-forced captioning loss: each caption's mean next-token cross-entropy over its
    targets (words and ``<eot>``), averaged over captions (each caption weighs the same)."""
    return (-caption_log_likelihood(logits, ids, ends) / ends.clamp_min(1).to(logits.dtype)).mean()


class Captioner(nn.Module):
    """CoCa (``contrastive=True``) or a SimVLM-style captioner (see the module docstring)."""

    def __init__(self, config: CaptionerConfig, tokenizer: WordTokenizer, visual: nn.Module | None = None):
        """``visual`` is the image encoder to use (default: built from ``config``); it must be
        what ``config.backbone`` and ``config.width`` describe, as a card rebuilds it from them."""
        super().__init__()
        if tokenizer.context_length > config.context_length:
            raise ValueError(f"tokenizer context_length {tokenizer.context_length} exceeds the model's "
                             f"{config.context_length}")
        c = config
        self.config, self.tokenizer = c, tokenizer
        self.visual = visual if visual is not None else build_backbone(c.backbone, width=c.width)
        d_img = self.visual.out_dim
        if c.caption_queries > 0:
            self.caption_pooler: nn.Module = AttentionalPooler(c.text_width, d_img, c.caption_queries, c.text_heads)
        else:  # SimVLM: the decoder reads every image token, mapped to its width
            self.caption_pooler = nn.Sequential(nn.LayerNorm(d_img), nn.Linear(d_img, c.text_width),
                                                nn.LayerNorm(c.text_width))
        self.decoder = CaptionDecoder(len(tokenizer), c.context_length, c.text_width, c.text_heads,
                                      c.unimodal_layers, c.multimodal_layers)
        if c.contrastive:
            self.contrastive_pooler = AttentionalPooler(c.text_width, d_img, 1, c.text_heads)
            self.image_projection = nn.Linear(c.text_width, c.embed_dim, bias=False)
            self.ln_text = nn.LayerNorm(c.text_width)
            self.text_projection = nn.Linear(c.text_width, c.embed_dim, bias=False)
            self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / c.init_temperature)))
            for proj in (self.image_projection, self.text_projection):
                nn.init.normal_(proj.weight, std=c.text_width ** -0.5)

    # ------------------------------------------------------------------ text and image parts

    @property
    def device(self) -> torch.device:
        return self.decoder.positional_embedding.device

    def tokenize(self, texts: Sequence[str] | str, truncate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and ``<eot>`` positions on the model's device."""
        ids, eot = self.tokenizer.encode(texts, truncate=truncate)
        return ids.to(self.device), eot.to(self.device)

    def image_context(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(decoder context N×T'×text_width, contrastive image embedding N×embed_dim or None)``
        from one pass of the backbone over images in [0, 1]."""
        tokens = image_tokens(self.visual, images)
        pooled = None
        if self.config.contrastive:
            pooled = self.image_projection(self.contrastive_pooler(tokens)[:, 0])
        return self.caption_pooler(tokens), pooled

    def _require_contrastive(self) -> None:
        if not self.config.contrastive:
            raise ValueError("this captioner has no contrastive head (contrastive=False)")

    @property
    def logit_scale(self) -> torch.Tensor:
        """1/τ = exp(t), clamped at ``max_logit_scale`` (contrastive head only)."""
        self._require_contrastive()
        return self.log_logit_scale.exp().clamp(max=self.config.max_logit_scale)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clip 1/τ's parameter after an optimiser step, as CLIP does (no-op without the head)."""
        if self.config.contrastive:
            self.log_logit_scale.clamp_(max=math.log(self.config.max_logit_scale))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Contrastive image embeddings (not normalised), N×embed_dim."""
        self._require_contrastive()
        return self.image_context(images)[1]

    def _text_embedding(self, h: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        return self.text_projection(self.ln_text(h[torch.arange(len(h), device=h.device), eot]))

    def encode_text(self, texts: Sequence[str] | str | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Contrastive text embeddings (not normalised) of captions, as strings or ``(ids, eot)``:
        the unimodal layers' ``<eot>`` output — the image plays no part."""
        self._require_contrastive()
        ids, eot = texts if isinstance(texts, tuple) else self.tokenize(texts)
        ids = ids[:, : int(eot.max()) + 1] if len(eot) else ids  # causal: padding after <eot> is irrelevant
        return self._text_embedding(self.decoder.unimodal_features(ids), eot)

    # ------------------------------------------------------------------ training

    def forward(self, images: torch.Tensor, ids: torch.Tensor, eot_index: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(next-token logits N×(L−1)×V, image embedding, text embedding)`` for captions
        ``ids`` (inputs ``ids[:, :-1]`` predict ``ids[:, 1:]``); the embeddings are None
        without the contrastive head. ``L`` is cut at the batch's last ``<eot>``."""
        ids = ids[:, : int(eot_index.max()) + 1]
        context, image_emb = self.image_context(images)
        h = self.decoder.unimodal_features(ids)
        text_emb = self._text_embedding(h, eot_index) if self.config.contrastive else None
        return self.decoder.multimodal_logits(h[:, :-1], context), image_emb, text_emb

    def losses(self, images: torch.Tensor, ids: torch.Tensor, eot_index: torch.Tensor,
               targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"caption": CE}`` plus ``"contrastive"`` with the contrastive head. ``targets``
        (default ``ids``) are the tokens to predict, e.g. the true words when ``ids`` had
        word dropout applied."""
        logits, image_emb, text_emb = self(images, ids, eot_index)
        targets = (ids if targets is None else targets)[:, : logits.shape[1] + 1]
        out = {"caption": caption_loss(logits, targets, eot_index)}
        if self.config.contrastive:
            out["contrastive"] = clip_loss(image_emb, text_emb, self.logit_scale)
        return out

    def loss(self, images: torch.Tensor, ids: torch.Tensor, eot_index: torch.Tensor,
             contrastive_weight: float = 1.0, caption_weight: float = 2.0,
             targets: torch.Tensor | None = None) -> torch.Tensor:
        """λ_con · contrastive + λ_cap · captioning (CoCa's defaults: 1 and 2); the contrastive
        term only with the head (a SimVLM captioner needs ``contrastive_weight == 0``)."""
        parts = self.losses(images, ids, eot_index, targets)
        if "contrastive" not in parts:
            if contrastive_weight:
                raise ValueError("contrastive_weight must be 0 for a captioner without a contrastive head")
            return caption_weight * parts["caption"]
        return contrastive_weight * parts["contrastive"] + caption_weight * parts["caption"]

    # ------------------------------------------------------------------ inference

    def log_likelihood(self, images: torch.Tensor, ids: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """log p(caption | image) of each (image, caption) pair, N."""
        logits, _, _ = self(images, ids, eot_index)
        return caption_log_likelihood(logits, ids[:, : logits.shape[1] + 1], eot_index)

    def _max_tokens(self, max_tokens: int | None) -> int:
        cap = self.config.context_length - 1
        max_tokens = cap if max_tokens is None else int(max_tokens)
        if not 1 <= max_tokens <= cap:
            raise ValueError(f"max_tokens must be in [1, {cap}] (context_length − 1), got {max_tokens}")
        return max_tokens

    @torch.no_grad()
    def generate_ids(self, images: torch.Tensor, max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy captions of a batch of images: ``(ids N×L, ends N)``, ``ids[:, 0] = <sot>``,
        then at most ``max_tokens`` tokens (default: up to the context length); a row stops
        at its ``<eot>`` (``ends`` is its position, or the last position when the cap came
        first) and is padded after. ``<pad>``, ``<sot>`` and ``<unk>`` are never generated.
        Deterministic; the whole batch advances together and stops when every row has ended."""
        max_tokens = self._max_tokens(max_tokens)
        context, _ = self.image_context(images)
        n, tok = len(images), self.tokenizer
        ids = torch.full((n, 1), tok.sot_id, dtype=torch.long, device=context.device)
        done = torch.zeros(n, dtype=torch.bool, device=context.device)
        banned = torch.tensor([tok.pad_id, tok.sot_id, tok.unk_id], device=context.device)
        for _ in range(max_tokens):
            logits = self.decoder.multimodal_logits(self.decoder.unimodal_features(ids), context)[:, -1]
            logits[:, banned] = -math.inf
            nxt = torch.where(done, torch.full_like(done, tok.pad_id, dtype=torch.long), logits.argmax(-1))
            ids = torch.cat([ids, nxt[:, None]], 1)
            done |= nxt == tok.eot_id
            if bool(done.all()):
                break
        is_eot = ids == tok.eot_id
        ends = torch.where(is_eot.any(1), is_eot.int().argmax(1), torch.full_like(done, ids.shape[1] - 1, dtype=torch.long))
        return ids, ends

    @torch.no_grad()
    def generate(self, images: torch.Tensor, max_tokens: int | None = None) -> list[str]:
        """Greedy captions of images in [0, 1], one string per image (see :meth:`generate_ids`)."""
        ids, _ = self.generate_ids(images, max_tokens)
        return [self.tokenizer.decode(row) for row in ids.cpu()]
