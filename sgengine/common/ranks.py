"""Rank helpers that work alike in one process and under torchrun (no-ops without a group).

The leaf layer: every layer that must agree across ranks (k-means, evaluation, online clustering,
the trainer) imports these, never the trainer's distributed set-up.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Only the main rank writes files and shows progress."""
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank and world size from the torchrun environment (1 process without it)."""
    env = os.environ
    return DistInfo(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def world_size() -> int:
    """Ranks in the initialised process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """Elementwise sum of a tensor over all ranks (a detached copy; the input is left as it is)."""
    value = value.detach().clone()
    if world_size() > 1:
        dist.all_reduce(value)
    return value


def min_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """Elementwise minimum of a tensor over all ranks (a detached copy)."""
    value = value.detach().clone()
    if world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value


def mean_over_ranks(value: torch.Tensor) -> float:
    """The mean of a scalar over all ranks (the loss every rank logs is the global one)."""
    return float(sum_over_ranks(value)) / world_size()


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (n_r, ...) concatenated in rank order, on every rank; n_r may differ
    (0 included). No gradient flows back through the other ranks' rows."""
    if world_size() == 1:
        return x
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device))
    counts = [int(c) for c in counts]
    padded = x.new_zeros(max(counts), *x.shape[1:])
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    parts[dist.get_rank()] = x  # this rank's own rows keep their graph
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def from_main(obj):
    """Rank 0's value of a picklable object, on every rank (a no-op in a single process)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
