"""Sinkhorn-Knopp equipartition codes, as SwAV's ``distributed_sinkhorn`` (Caron et al. 2020).

SwAV (K prototypes, B samples, scores s of shape (B, K)) computes, in K x B layout,

    Q = exp(s / eps)^T;  Q /= sum(Q)
    repeat iters times:  Q /= Q.sum(1) * K     (each prototype's mass 1/K, eq. 10's q_c)
                         Q /= Q.sum(0) * B     (each sample's mass 1/B, eq. 10's q_r)
    return (Q * B)^T                           (each sample's row of the (B, K) result sums to 1)

which is P* = diag(r_u) exp(s / eps) diag(r_v) of the online-self-guidance paper (eq. 13). Here
the scaling vectors are kept as log potentials, with S = s / eps:

    a_k = log sum_b exp(S_bk - h_b)     (prototype potential, h = 0 on the first pass)
    h_b = log sum_k exp(S_bk - a_k)     (sample potential)
    Q_bk = exp(S_bk - a_k - h_b)

Every log-sum-exp subtracts its running maximum, so no exponent is ever positive: no overflow for
eps=0.01 or half-precision scores, and no 0/0 row even when one sample's scores all sit far below
the others' (where a single global max would underflow the whole row). SwAV's global
normalisation, the 1/K and 1/B factors and the final *B are constants on a potential and cancel
exactly; only the per-prototype sums need to cross ranks, which this file all-reduces (as SwAV's
``dist.all_reduce(sum_of_rows)``), as a (max, sum of exponentials) pair.

Triton (``_sinkhorn_triton``, imported only when that path runs): the potentials pass over the
matrix alternately by columns (``_col_kernel``, one program per prototype tile, online over all
samples) and by rows (``_row_kernel``, one program per sample block); the last row pass also
writes Q. 2 * iters + 1 reads of the scores and one write of Q, no atomics (deterministic). Small
problems run in a single program (``_fused_kernel``), one launch. Kernels work in base 2 (exp2
is the hardware path): potentials are in log2 units.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ._backend import resolve_backend

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FUSED_MAX_NUMEL = 1 << 15  # up to here one program beats 2 * iters launches (~128 KB in L2)


def _check_inputs(scores: torch.Tensor, eps: float, iters: int) -> None:
    if scores.dim() != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty (B, K) matrix of sample-prototype scores, got "
                         f"shape {tuple(scores.shape)}; flatten extra dims first: scores.flatten(0, -2)")
    if scores.dtype not in _DTYPES:
        raise TypeError(f"scores must be float16, bfloat16 or float32, got {scores.dtype}: "
                        "cast with scores.float()")
    if not eps > 0:
        raise ValueError(f"eps (the entropic temperature) must be > 0, got {eps}; SwAV uses 0.05")
    if int(iters) != iters or iters < 1:
        raise ValueError(f"iters must be an integer >= 1, got {iters}; SwAV uses 3")


def _across_ranks(distributed: bool) -> bool:
    return distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _allreduce_lse(a: torch.Tensor, exp, log) -> torch.Tensor:
    """log sum over ranks of exp(a), elementwise: all-reduce the max, then the shifted sums."""
    m = a.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    s = exp(a - m)
    dist.all_reduce(s)
    return m + log(s)


def _iterate(col, row, assign, iters: int, reduce=None) -> torch.Tensor:
    """The Sinkhorn loop on potentials: col(h) -> a, row(a) -> h, assign(a) -> Q on the last pass."""
    h = None
    for it in range(iters):
        a = col(h)
        if reduce is not None:
            a = reduce(a)
        if it == iters - 1:
            return assign(a)
        h = row(a)


@torch.no_grad()
def sinkhorn_ref(scores: torch.Tensor, eps: float = 0.05, iters: int = 3, backend: str = "auto",
                 distributed: bool = True) -> torch.Tensor:
    """PyTorch Sinkhorn on log potentials; same contract as :func:`sinkhorn` (``backend`` ignored)."""
    _check_inputs(scores, eps, iters)
    S = scores.float() / eps

    def col(h):
        return torch.logsumexp(S if h is None else S - h[:, None], dim=0)

    def row(a):
        return torch.logsumexp(S - a, dim=1)

    def assign(a):
        x = S - a
        return torch.exp(x - torch.logsumexp(x, dim=1, keepdim=True))

    reduce = (lambda a: _allreduce_lse(a, torch.exp, torch.log)) if _across_ranks(distributed) else None
    return _iterate(col, row, assign, iters, reduce)


@torch.library.custom_op("sgengine::sinkhorn", mutates_args=())
def _sinkhorn_op(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """Single-process Triton Sinkhorn: one fused program when small, else alternating passes."""
    from . import _sinkhorn_triton as kernels  # triton is imported by the Triton path only

    if scores.numel() <= _FUSED_MAX_NUMEL:
        return kernels.fused(scores, eps, iters)
    return _iterate(*kernels.passes(scores, eps), iters)


@_sinkhorn_op.register_fake
def _(scores, eps, iters):
    return scores.new_empty(scores.shape, dtype=torch.float32)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iters: int = 3, backend: str = "auto",
             distributed: bool = True) -> torch.Tensor:
    """Equipartitioned soft assignments of samples to prototypes (SwAV's Sinkhorn-Knopp codes).

    Args:
        scores: (B, K) float32, bfloat16 or float16 sample-prototype scores (logits), any strides.
        eps: entropic temperature (1/lambda of eq. 12); 0.05 as SwAV and the paper.
        iters: Sinkhorn iterations (>= 1); 3 as SwAV and the paper.
        backend: "auto" (Triton on CUDA, PyTorch on CPU), "triton" or "torch".
        distributed: when torch.distributed is initialised with more than one rank, balance the
            prototypes over the batch of all ranks (each rank passes its own B_r rows; the ranks'
            batches may differ in size). Every rank must call this collectively.

    Returns:
        Q: (B, K) float32, each row sums to 1; no gradient (codes are targets).
    """
    _check_inputs(scores, eps, iters)
    if resolve_backend(backend, scores) == "torch":
        return sinkhorn_ref(scores, eps, iters, distributed=distributed)
    if scores.numel() >= 2**31:  # the kernels index with int32 offsets
        raise ValueError(f"{tuple(scores.shape)} scores exceed the Triton kernels' 2^31 elements: "
                         "use backend='torch'")
    if not _across_ranks(distributed):
        return _sinkhorn_op(scores, float(eps), int(iters))
    from ._sinkhorn_triton import passes

    return _iterate(*passes(scores, float(eps)), int(iters),
                    reduce=lambda a: _allreduce_lse(a, torch.exp2, torch.log2))
