"""Results that do not depend on the number of CPU threads.

A forward pass of the same model on the same images can differ in the last bit between one
and two threads: where MKL's matrix product (``?gemm``, behind ``nn.Linear`` and behind
PyTorch's own convolution path, which it takes for a single image or small spatial sizes)
has few rows and columns but a long inner dimension, it splits that sum across threads, and
float addition is not associative. A logit that moves by 1e-7 can flip a near-tie ``argmax``,
so one fooled/not-fooled decision of Algorithm 1 flips, and every later update follows
another path: measured here, a 2-pass ``deepfool-batched`` run on the zoo's SimCLR model
gave fooling rates 31.7 % with one thread and 33.3 % with two, and ``bn_net`` (a 16 384-wide
linear layer) gave another ``v`` after one pass.

MKL's strict *conditional numerical reproducibility* mode makes ``?gemm`` bitwise
reproducible when the number of threads changes (oneMKL Developer Guide, "Reproducibility
Conditions": strict CNR mode, AVX2 and AVX-512 code paths). :func:`reproducible_across_threads`
asks for it through ``MKL_CBWR``, which MKL reads at its first call; ``import uap`` calls it, so
it is in place before the engine runs a model. A ``MKL_CBWR`` the user set is left alone. oneDNN's
convolutions (the batched path) already split only over images, channels and pixels, never
inside a sum, in the forward and input-gradient passes the engine runs (checked on every zoo
model, AVX-512 and ``ONEDNN_MAX_CPU_ISA=AVX2``). What stays thread-dependent: builds whose BLAS
is not MKL (e.g. OpenBLAS on ARM), and weight gradients of training (oneDNN reduces them over
the batch per thread), which crafting never computes.
"""
from __future__ import annotations

import os

__all__ = ["MKL_CBWR", "reproducible_across_threads"]

#: MKL's code path chosen for the CPU as usual, in strict CNR mode.
MKL_CBWR = "AUTO,STRICT"


def reproducible_across_threads() -> str:
    """Ask MKL for thread-count-independent matrix products (unless ``MKL_CBWR`` is set);
    returns the setting in force. Takes effect only before MKL's first call in the process."""
    return os.environ.setdefault("MKL_CBWR", MKL_CBWR)
