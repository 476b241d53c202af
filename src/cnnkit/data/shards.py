"""A split shared by several processes, and its inverse: the round-robin shards a
:class:`~cnnkit.data.TensorLoader` hands each rank (``rank``, ``world_size``), summed or
gathered back in order.

Evaluation over a sharded split sums on each rank and all-reduces the sums (loss, correct
predictions, confusion matrix ...) before dividing by the global count, so the metrics
equal one process's; per-sample outputs are gathered back in the split's order. In a
single process every function here returns its input.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce", "all_reduce_sum", "gather_shards", "is_sharded", "active", "comm_device"]


def is_sharded(loader: object) -> bool:
    """The loader is one rank's share of a split: its sums must be reduced across ranks."""
    return getattr(loader, "world_size", 1) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def comm_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo moves CPU tensors (and CUDA ones through the host).
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """``t`` reduced by ``op`` over all ranks, as a new tensor on ``t``'s device (``t``
    itself alone)."""
    if not active():
        return t
    buf = t.detach().to(comm_device(), copy=True)
    dist.all_reduce(buf, op=op)
    return buf.to(t.device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over all ranks (``t`` itself alone)."""
    return all_reduce(t, dist.ReduceOp.SUM)


def gather_shards(t: torch.Tensor) -> torch.Tensor:
    """Undo round-robin sharding: rank r holds items r, r + W, r + 2W ... of a sequence (rows
    of ``t``, as many as it has); every rank gets the whole sequence, in order.

    Example:
        >>> import torch
        >>> from cnnkit.data.shards import gather_shards
        >>> gather_shards(torch.arange(3))  # one process: unchanged
        tensor([0, 1, 2])
    """
    if not active():
        return t
    world, dev = dist.get_world_size(), comm_device()
    x = t.detach().to(dev).contiguous()
    sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(x)], device=dev))
    counts = [int(s) for s in sizes]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = x.new_empty((sum(counts), *x.shape[1:]))
    for r, (part, k) in enumerate(zip(parts, counts, strict=True)):
        rows = out[r::world]
        if len(rows) != k:
            raise RuntimeError(f"rank {r} holds {k} items, not every {world}-th of {len(out)}: "
                               "the shards were not made round-robin")
        rows.copy_(part[:k])
    return out.to(t.device)
