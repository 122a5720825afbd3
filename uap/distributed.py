"""Data parallelism over ``torch.distributed``: the process group, shards, and the collectives.

Every library call gives the one-process result under an initialised process group (launched
by ``torchrun``, gloo on CPU, NCCL on CUDA): work is split over the ranks, the pieces are
combined with collectives, and every rank ends with the same numbers. Without a process group
(or with one rank) every function here is the identity, so single-process code paths are the
ones that always ran.

- :func:`shard` gives this rank its contiguous share of ``range(n)``;
- :func:`gather_rows` puts the ranks' shares back together in order (a variable-length
  all-gather); :func:`gather_rows_with_grad` does the same inside autograd, sending each
  rank the gradient of its own rows (global negatives for contrastive losses);
- :func:`all_sum` sums a tensor over the ranks (:func:`all_sum_with_grad` inside autograd:
  global batch-norm statistics); :func:`broadcast` copies rank 0's (or another rank's) tensor,
  and :func:`broadcast_json` its JSON value (decisions such as "resume from this checkpoint");
- :func:`alone` lets rank 0 compute by itself (figures, files) while the others skip that work;
- :func:`process_group` initialises the group from torchrun's environment (and tears it down),
  for the command line; :func:`is_main` says whether this process should print and write.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist

__all__ = [
    "world", "is_distributed", "is_main", "shard", "gather_rows", "gather_rows_with_grad", "all_sum", "all_sum_with_grad", "broadcast",
    "broadcast_json", "alone", "process_group",
]

#: How long a collective may wait for the other ranks before the job fails (a rank that
#: raised never joins, so the others must not hang).
TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("UAP_DIST_TIMEOUT", "120")))


_alone = 0  # > 0 inside alone(): this process works by itself


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process; ``(0, 1)`` without a process group (or inside :func:`alone`)."""
    if dist.is_available() and dist.is_initialized() and not _alone:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Within the block this process computes by itself, as without a process group: for work
    only rank 0 does (figures, files), which must not wait for ranks that are not there."""
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1


def is_distributed() -> bool:
    """Whether more than one process takes part."""
    return world()[1] > 1


def is_main() -> bool:
    """Whether this process is rank 0 (the one that prints and writes)."""
    return world()[0] == 0


def shard(n: int) -> slice:
    """This rank's contiguous share of ``range(n)``: ranks get ⌊n/W⌋ or ⌈n/W⌉ items, in rank order."""
    rank, size = world()
    return slice(rank * n // size, (rank + 1) * n // size)


def _wire(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` on the device the backend communicates from (NCCL: the GPU)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return t.detach().to(device).clone().contiguous()


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """The ranks' :func:`shard` s of an ``n``-row tensor, concatenated in rank order (on every rank)."""
    rank, size = world()
    if size == 1:
        return local
    bounds = [(r * n // size, (r + 1) * n // size) for r in range(size)]
    longest = max(b - a for a, b in bounds)
    padded = _wire(local.new_zeros((longest, *local.shape[1:])))
    padded[:local.shape[0]] = local.to(padded.device)
    pieces = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:b - a] for piece, (a, b) in zip(pieces, bounds)]).to(local.device)


class _GatherRows(torch.autograd.Function):
    """:func:`gather_rows` whose backward sums the ranks' gradients of the whole gathered
    tensor and hands each rank the rows it contributed."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, n: int) -> torch.Tensor:
        ctx.n = n
        return gather_rows(local, n)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # Every rank's loss may depend on every row; the total's gradient for this rank's rows
        # is the sum over the ranks of their gradients for those rows.
        return all_sum(grad.contiguous())[shard(ctx.n)], None


def gather_rows_with_grad(local: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """``(all rows, this rank's rows)``: the ranks' :func:`shard` s of a global batch
    concatenated in rank order, differentiably, and where this rank's ``local`` lies in it.

    The backward pass all-reduces the gradient of the gathered tensor and keeps this rank's
    rows, so when every rank back-propagates its share of a loss over the gathered batch,
    each rank's rows receive the gradient of the sum of all shares (SimCLR's and CLIP's
    negatives from the global batch). The global row count is summed over the ranks, and
    ``local`` must have the row count of this rank's ``shard`` of it. Without a process
    group: ``(local, slice(0, len(local)))``.
    """
    if not is_distributed():
        return local, slice(0, len(local))
    n = int(all_sum(torch.tensor([len(local)], dtype=torch.int64)))
    mine = shard(n)
    if len(local) != mine.stop - mine.start:
        raise ValueError(f"this rank holds {len(local)} rows, but its share of the {n} rows is {mine.stop - mine.start}")
    return _GatherRows.apply(local, n), mine


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks (a new tensor; ``t`` itself without a process group)."""
    if not is_distributed():
        return t
    out = _wire(t)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


class _AllSum(torch.autograd.Function):
    """:func:`all_sum` whose backward is an all-sum too: the sum feeds every rank's loss, so
    each rank's addend gets the sum of the ranks' gradients of the sum."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return all_sum(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return all_sum(grad.contiguous())


def all_sum_with_grad(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks, differentiably (see :class:`_AllSum`); ``t`` itself
    without a process group."""
    return _AllSum.apply(t) if is_distributed() else t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``t`` on every rank (``t`` itself without a process group); the other
    ranks pass a tensor of the same shape and dtype."""
    if not is_distributed():
        return t
    out = _wire(t)
    dist.broadcast(out, src=src)
    return out.to(t.device)


def broadcast_json(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s JSON-serialisable ``value`` on every rank (sent as UTF-8 bytes, never pickled)."""
    if not is_distributed():
        return value
    data = json.dumps(value).encode("utf-8") if world()[0] == src else b""
    length = int(broadcast(torch.tensor([len(data)], dtype=torch.int64), src))
    payload = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if world()[0] == src
               else torch.zeros(length, dtype=torch.uint8))
    return json.loads(bytes(broadcast(payload, src).tolist()).decode("utf-8"))


@contextlib.contextmanager
def process_group(device: torch.device | None = None) -> Iterator[bool]:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1),
    for the block, and leave it afterwards, also on error. Yields whether the run is distributed.

    The backend follows the device: NCCL for CUDA, gloo otherwise. Every rank seeds alike, so
    the ranks draw the same subsets and visiting orders. A group the caller initialised is used
    as it is and left alone.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        yield is_distributed()
        return
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    try:
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        yield True
    finally:
        dist.destroy_process_group()
