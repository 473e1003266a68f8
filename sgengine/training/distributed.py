"""Data parallelism without DeepSpeed: process groups, batch sharding, per-shard seeds.

The global batch of one optimizer step is ``batch_size * world * grad_accum`` images:
``batch_size`` is what one rank feeds the network in one forward (DeepSpeed's
train_micro_batch_size_per_gpu). Every rank draws the same global indices from the
shared data generator and keeps its own shards; shard ``s = micro * world + rank``
owns the slice ``[s * batch_size, (s + 1) * batch_size)`` and seeds its diffusion
noise from ``(seed, step, s)``. So two ranks, one rank with ``grad_accum=2`` and any
mix in between see the very same images and noise: their loss curves agree to
floating-point reduction order, which is what tests/test_distributed.py checks.
"""
from __future__ import annotations

import os
import socket
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
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


def local_device(device: torch.device, info: DistInfo) -> torch.device:
    """One GPU per rank: cuda -> cuda:LOCAL_RANK."""
    if device.type != "cuda" or device.index is not None:
        return device
    torch.cuda.set_device(info.local_rank)
    return torch.device("cuda", info.local_rank)


def setup(device: torch.device, info: DistInfo, need_group: bool) -> None:
    """Join the process group (nccl on CUDA, gloo on CPU); DeepSpeed needs one even alone."""
    if dist.is_initialized() or not (need_group or info.world > 1):
        return
    if info.world == 1:  # single process launched without torchrun: a group of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            os.environ.setdefault(key, value)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=info.rank, world_size=info.world,
                            device_id=device if device.type == "cuda" else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard_slice(batch_size: int, micro: int, info: DistInfo) -> slice:
    """This rank's rows of the global batch for micro-step ``micro`` (see the module doc)."""
    s = micro * info.world + info.rank
    return slice(s * batch_size, (s + 1) * batch_size)


def shard_seed(seed: int, step: int, micro: int, info: DistInfo) -> int:
    """A distinct, reproducible noise seed per (run seed, step, shard): no state to save."""
    shard = micro * info.world + info.rank
    return int(np.random.SeedSequence([seed, step, shard]).generate_state(1, np.uint64)[0] >> 1)


def world_size() -> int:
    """Ranks in the initialised process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """Elementwise sum of a tensor over all ranks (a detached copy; the input is left as it is)."""
    value = value.detach().clone()
    if world_size() > 1:
        dist.all_reduce(value)
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


def wrap_ddp(net: torch.nn.Module, device: torch.device, find_unused: bool = False) -> torch.nn.Module:
    """torch DDP: gradients averaged over ranks during backward. ``find_unused``: some parameters
    take no part in some steps (it costs a graph traversal per step, so only when needed)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused)


def accumulating(wrapped, micro: int, accum: int):
    """DDP skips the gradient all-reduce on every micro-step but the last."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(wrapped, DistributedDataParallel) and micro < accum - 1:
        return wrapped.no_sync()
    return nullcontext()
