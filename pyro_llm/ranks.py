"""Data parallelism over ``torch.distributed`` ranks (a job launched by ``torchrun`` or
``accelerate launch``): which rank this is, its share of a pass's batches, and the collectives
that turn per-rank partial results into the whole, each in one flat buffer (one bucket).

Every pass of the library that reads a data set (the SVI step's minibatch, the K-FAC fit, the GLM
and sampled predictives) shards its work by rank when a process group of several ranks is
initialised; every rank must then call it, as with any collective. Without a process group (or
with one rank) each function here is the identity and no communication happens.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import torch
from torch import distributed as dist

__all__ = ["world", "shard", "sum_across", "max_across", "rows_across"]

T = TypeVar("T")


def world() -> tuple[int, int]:
    """``(rank, world size)``: ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items`` (every ``world``-th, from its rank): the same list on every
    rank gives disjoint shares that cover it."""
    rank, size = world()
    return list(items[rank::size])


def _device() -> torch.device:
    """Where the process group's backend reduces: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(tensors: list[torch.Tensor], op: dist.ReduceOp) -> list[torch.Tensor]:
    if world()[1] == 1 or not tensors:
        return tensors
    dtype = tensors[0].dtype
    if any(t.dtype != dtype for t in tensors):
        raise TypeError("tensors reduced in one bucket must share a dtype")
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(_device())
    dist.all_reduce(flat, op=op)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].view_as(t).to(t.device))
        start += t.numel()
    return out


def sum_across(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The element-wise sums over ranks of ``tensors`` (one dtype), in one all-reduce."""
    return _reduce(tensors, dist.ReduceOp.SUM)


def max_across(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The element-wise maxima over ranks of ``tensors`` (one dtype), in one all-reduce."""
    return _reduce(tensors, dist.ReduceOp.MAX)


def rows_across(batches: Sequence[torch.Tensor], parts: Sequence[torch.Tensor], shape: Sequence[int],
                dtype: torch.dtype) -> torch.Tensor:
    """A pass's whole result (``shape``, ``dtype``, on the CPU) on every rank, from each rank's
    ``parts``: ``parts[i]`` holds the rows ``batches[i]`` (along the first dimension); a rank may
    have none. Each rank writes its rows into zeros and the ranks sum."""
    out = torch.zeros(tuple(shape), dtype=dtype)
    if parts:
        out.index_copy_(0, torch.cat(list(batches)).cpu(), torch.cat([p.cpu() for p in parts]).to(dtype))
    return sum_across([out])[0]
