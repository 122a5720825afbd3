"""CLIP's symmetric contrastive loss (Radford et al. 2021, Fig. 3).

For a batch of N matching pairs with image embeddings ``n_i`` and text embeddings ``d_j``,
``s_ij = cos(n_i, d_j)`` and a temperature ``τ`` (CLIP learns ``1/τ`` as ``logit_scale``):

    L_img→txt = −(1/N) Σ_i log softmax_j(s_ij / τ)[i]     (each image picks its caption)
    L_txt→img = −(1/N) Σ_j log softmax_i(s_ij / τ)[j]     (each caption picks its image)
    L = (L_img→txt + L_txt→img) / 2

Embeddings are normalised inside, so gradients flow through the normalisation (the tests
check ∂L_img→txt/∂n_i against its closed form). Under ``torch.distributed`` each rank passes
its share of the global batch; :func:`clip_loss` contrasts its images and captions with those
of every rank (gathered with gradients, :func:`uap.distributed.gather_rows_with_grad`), as
CLIP does across its devices.

Examples:
    >>> import torch
    >>> img, txt = torch.randn(8, 16), torch.randn(8, 16)
    >>> loss = clip_loss(img, txt, logit_scale=torch.tensor(1 / 0.07))
    >>> bool(loss > 0)
    True
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.precision import float32_loss
from uap.distributed import gather_rows_with_grad

__all__ = ["similarity_logits", "info_nce", "clip_loss"]


def similarity_logits(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """``logit_scale · cos(a_i, b_j)`` for all pairs (N×M)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"embeddings must be N×D and M×D with the same D, got {tuple(a.shape)} and {tuple(b.shape)}")
    return logit_scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


@float32_loss
def info_nce(queries: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """One direction of the loss: −(1/N) Σ_i log softmax_j(scale · cos(q_i, k_j))[i]; the
    positive of query ``i`` is key ``i``."""
    if len(queries) != len(keys):
        raise ValueError(f"{len(queries)} queries but {len(keys)} keys: pairs must match one to one")
    logits = similarity_logits(queries, keys, logit_scale)
    return F.cross_entropy(logits, torch.arange(len(queries), device=logits.device))


@float32_loss
def clip_loss(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
              logit_scale: torch.Tensor | float) -> torch.Tensor:
    """The symmetric loss: mean of image→text and text→image cross-entropies.

    Distributed, the rows are this rank's pairs; each of its images (captions) is classified
    among the captions (images) of the global batch, and the loss is the mean over this rank's
    rows: the ranks' losses weighted by their shares add up to the one-process loss."""
    if len(image_embeddings) != len(text_embeddings):
        raise ValueError(f"{len(image_embeddings)} images but {len(text_embeddings)} captions: "
                         "pairs must match one to one")
    (images, mine), (texts, _) = gather_rows_with_grad(image_embeddings), gather_rows_with_grad(text_embeddings)
    target = torch.arange(mine.start, mine.stop, device=images.device)
    image_to_text = similarity_logits(images[mine], texts, logit_scale)
    text_to_image = similarity_logits(texts[mine], images, logit_scale)
    return 0.5 * (F.cross_entropy(image_to_text, target) + F.cross_entropy(text_to_image, target))
