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

import numpy as np
import torch
import torch.distributed as dist

from ..common.ranks import DistInfo


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


def shard_seed(seed: int, step: int, micro: int, info: DistInfo, stream: int = 0) -> int:
    """A distinct, reproducible noise seed per (run seed, step, shard): no state to save. A
    ``stream`` > 0 gives an independent seed of the same shard for another kind of draw."""
    shard = micro * info.world + info.rank
    key = [seed, step, shard] + ([stream] if stream else [])  # stream 0: the seeds of before streams
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1)


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
