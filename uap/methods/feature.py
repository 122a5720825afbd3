"""Label-free universal perturbations for encoders: push embeddings away from their clean value.

Self-supervised encoders (SimCLR, MoCo, BYOL, DINO, CLIP's image tower) have no classifier of
their own: the downstream head — linear probe, kNN, zero-shot text prompts — is chosen later
by whoever uses the features. A perturbation that should hurt *every* head must therefore be
crafted on the encoder alone, without labels or a probe. In the spirit of SSP (Naseer et al.,
"A self-supervised approach for adversarial robustness", CVPR 2020: maximise feature
distortion) and AdvEncoder (Zhou et al., ICCV 2023: universal perturbations against
pre-trained encoders), this method maximises, by minibatch projected steepest ascent
(:mod:`uap.methods.ascent`), the mean embedding distance between clean and perturbed images::

    D(v) = mean_i d(f(x_i), f(clip(x_i + v)))      f = model.encoder
    d = 1 − cos(a, b)                 ("cosine", default: what kNN and zero-shot heads read)
    d = ‖a − b‖₂² / mean_i ‖a_i‖₂²    ("l2", SSP's feature distortion, scale-free)

Both distances have a zero gradient at ``v = 0`` (the clean point is a minimum), so a pass
that starts from ``v = 0`` first draws a random start of ℓp size ``init · ε`` (from the pass's
seeded generator). No label, no clean prediction and no head enter the objective; the
crafting driver still reports the fooling rate of the target's own head after each pass, and
``uap evaluate`` then measures the same ``v`` on every downstream head.

Options (``method_options``): ``batch_size`` (32), ``step_size`` (0.1, a fraction of ε),
``decay`` (0.7 per pass), ``distance`` (``"cosine"`` or ``"l2"``), ``init`` (0.25). The
encoder is attacked as the run attacks every model: batch-norm-folded unless asked not to.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F

from uap.distributed import is_distributed
from uap.forward import encoder_features, encoder_of
from uap.methods.ascent import Ascent, AscentOptions, Objective, random_start
from uap.methods.base import CraftContext, register_method
from uap.options import require

__all__ = ["Feature", "FeatureOptions", "embedding_distance"]

_DISTANCES = ("cosine", "l2")


def embedding_distance(clean: torch.Tensor, perturbed: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """Mean distance between matching rows of two N×… feature tensors (flattened per row).

    ``"cosine"``: ``mean_i 1 − cos(a_i, b_i)`` ∈ [0, 2]. ``"l2"``: ``mean_i ‖a_i − b_i‖₂²``
    divided by ``mean_i ‖a_i‖₂²`` (so the value does not depend on the feature scale).
    """
    a, b = clean.flatten(1), perturbed.flatten(1)
    if a.shape != b.shape:
        raise ValueError(f"feature shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if distance == "cosine":
        return (1.0 - F.cosine_similarity(a, b, dim=1)).mean()
    if distance == "l2":
        return (a - b).pow(2).sum(dim=1).mean() / a.pow(2).sum(dim=1).mean().clamp_min(1e-12)
    raise ValueError(f"unknown distance {distance!r}: use one of {', '.join(_DISTANCES)}")


@dataclass(frozen=True)
class FeatureOptions(AscentOptions):
    """:class:`~uap.methods.ascent.AscentOptions` plus the embedding ``distance`` and the size of
    the random start, ``init`` (a fraction of ε)."""

    distance: str = "cosine"
    init: float = 0.25

    def check(self) -> None:
        super().check()
        require(self.distance in _DISTANCES, f"unknown distance {self.distance!r}: use one of {', '.join(_DISTANCES)}")
        require(0 < self.init <= 1, f"init must be in (0, 1] (a fraction of eps), got {self.init!r}")


@register_method()
class Feature(Ascent):
    """The label-free feature UAP (module docstring)."""

    name = "feature"
    Options = FeatureOptions

    def splittable_for(self, ctx: CraftContext) -> bool:
        return self.options.distance != "l2"  # its normaliser spans the whole minibatch

    def objective(self, ctx: CraftContext) -> Objective:
        encoder = ctx.attacked(encoder_of(ctx.model, required=True, needed_by="method 'feature'"), ctx.x)
        opts = self.options
        if opts.distance == "l2" and is_distributed():
            raise ValueError("distance 'l2' is normalised by the whole minibatch's feature energy, which one rank's "
                             "share does not have; use distance 'cosine' under torch.distributed")
        random_start(ctx, opts.init)  # zero gradient at v = 0

        def objective(x_adv: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, None]:
            with torch.no_grad():
                clean = encoder_features(encoder, ctx.x[idx])
            return embedding_distance(clean, encoder_features(encoder, x_adv), opts.distance), None

        return objective
