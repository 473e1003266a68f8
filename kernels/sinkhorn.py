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

Triton: the potentials pass over the matrix alternately by columns (``_col_kernel``, one program
per prototype tile, online over all samples) and by rows (``_row_kernel``, one program per sample
block); the last row pass also writes Q. 2 * iters + 1 reads of the scores and one write of Q,
no atomics (deterministic). Small problems run in a single program (``_fused_kernel``), one
launch. Kernels work in base 2 (exp2 is the hardware path): potentials are in log2 units.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from ._backend import interpreter_on, resolve_backend

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
_FUSED_MAX_NUMEL = 1 << 15  # up to here one program beats 2 * iters launches (~128 KB in L2)


@triton.jit
def _col_lse(S, H, B, sb, sk, scale, offs_k, k_ok, HAS_H: tl.constexpr,
             BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """a_k = log2 sum_b 2^(x_bk - h_b), x = S * log2(e), online over row blocks -> (BLOCK_K,)."""
    m = tl.full([BLOCK_K], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_K], tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        b_ok = offs_b < B
        x = tl.load(S + offs_b[:, None] * sb + offs_k[None, :] * sk,
                    mask=b_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32) * scale
        if HAS_H:
            x -= tl.load(H + offs_b, mask=b_ok, other=0.0)[:, None]
        # Padded rows add nothing; padded columns stay finite (never stored) so no NaN arises.
        x = tl.where(b_ok[:, None], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 0))
        acc = acc * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new[None, :]), 0)
        m = m_new
    return m + tl.log2(acc)


@triton.jit
def _row_lse(S, A, K, sb, sk, scale, offs_b, b_ok, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """h_b = log2 sum_k 2^(x_bk - a_k), online over column blocks -> (BLOCK_B,)."""
    m = tl.full([BLOCK_B], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_B], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(S + offs_b[:, None] * sb + offs_k[None, :] * sk,
                    mask=b_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32) * scale
        x -= tl.load(A + offs_k, mask=k_ok, other=0.0)[None, :]
        x = tl.where(k_ok[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 1))
        acc = acc * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new[:, None]), 1)
        m = m_new
    return m + tl.log2(acc)


@triton.jit
def _write_q(S, A, Q, h, K, sb, sk, scale, offs_b, b_ok, BLOCK_K: tl.constexpr):
    """Q_bk = 2^(x_bk - a_k - h_b) for one row block, Q contiguous (B, K) fp32."""
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        mask = b_ok[:, None] & k_ok[None, :]
        x = tl.load(S + offs_b[:, None] * sb + offs_k[None, :] * sk, mask=mask, other=0.0)
        x = x.to(tl.float32) * scale - tl.load(A + offs_k, mask=k_ok, other=float("inf"))[None, :]
        tl.store(Q + offs_b[:, None] * K + offs_k[None, :], tl.exp2(x - h[:, None]), mask=mask)


@triton.jit
def _col_kernel(S, H, A, B, K, sb, sk, scale, HAS_H: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per prototype tile: the column potentials a (K,)."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    a = _col_lse(S, H, B, sb, sk, scale, offs_k, k_ok, HAS_H, BLOCK_B, BLOCK_K)
    tl.store(A + offs_k, a, mask=k_ok)


@triton.jit
def _row_kernel(S, A, H, Q, B, K, sb, sk, scale, WRITE_Q: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per sample block: the row potentials h (B,), or on the last pass Q itself."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    h = _row_lse(S, A, K, sb, sk, scale, offs_b, b_ok, BLOCK_B, BLOCK_K)
    if WRITE_Q:
        _write_q(S, A, Q, h, K, sb, sk, scale, offs_b, b_ok, BLOCK_K)
    else:
        tl.store(H + offs_b, h, mask=b_ok)


@triton.jit
def _fused_kernel(S, A, H, Q, B, K, sb, sk, scale, iters,
                  BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """All passes in one program (H arrives zeroed); barriers publish A and H to every warp."""
    for it in range(iters):
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            a = _col_lse(S, H, B, sb, sk, scale, offs_k, k_ok, True, BLOCK_B, BLOCK_K)
            tl.store(A + offs_k, a, mask=k_ok)
        tl.debug_barrier()
        for b0 in range(0, B, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            b_ok = offs_b < B
            h = _row_lse(S, A, K, sb, sk, scale, offs_b, b_ok, BLOCK_B, BLOCK_K)
            if it == iters - 1:
                _write_q(S, A, Q, h, K, sb, sk, scale, offs_b, b_ok, BLOCK_K)
            else:
                tl.store(H + offs_b, h, mask=b_ok)
        tl.debug_barrier()


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


def _blocks(B: int, K: int, dtype: torch.dtype) -> dict:
    """Tile sizes: column tiles of one 128-byte line per row; row blocks that fill ~2 waves."""
    if interpreter_on():  # the interpreter pays per program and per loop trip, not per element
        return dict(col=(64, 128), row=(min(16, triton.next_power_of_2(B)), 256))
    col_k = 128 // dtype.itemsize
    row_b = max(1, min(8, triton.next_power_of_2(B) // 256))
    return dict(col=(4096 // col_k, col_k), row=(row_b, 2048 // row_b))


def _triton_passes(scores: torch.Tensor, eps: float):
    """(col, row, assign) launchers for :func:`_iterate`; potentials in log2 units."""
    B, K = scores.shape
    scale, cfg = _LOG2E / eps, _blocks(B, K, scores.dtype)
    a = torch.empty(K, device=scores.device, dtype=torch.float32)
    h = torch.empty(B, device=scores.device, dtype=torch.float32)
    q = torch.empty((B, K), device=scores.device, dtype=torch.float32)
    (cb, ck), (rb, rk) = cfg["col"], cfg["row"]

    def col(h_prev):
        _col_kernel[(triton.cdiv(K, ck),)](scores, h if h_prev is None else h_prev, a, B, K,
                                           *scores.stride(), scale, HAS_H=h_prev is not None,
                                           BLOCK_B=cb, BLOCK_K=ck, num_warps=4)
        return a

    def row(a_now, write_q=False):
        _row_kernel[(triton.cdiv(B, rb),)](scores, a_now, h, q, B, K, *scores.stride(), scale,
                                           WRITE_Q=write_q, BLOCK_B=rb, BLOCK_K=rk, num_warps=4)
        return q if write_q else h

    return col, row, lambda a_now: row(a_now, write_q=True)


def _launch(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """Single-process Triton Sinkhorn: one fused program when small, else alternating passes."""
    B, K = scores.shape
    if B * K > _FUSED_MAX_NUMEL:
        return _iterate(*_triton_passes(scores, eps), iters)
    a = torch.empty(K, device=scores.device, dtype=torch.float32)
    h = torch.zeros(B, device=scores.device, dtype=torch.float32)
    q = torch.empty((B, K), device=scores.device, dtype=torch.float32)
    bk = min(256, triton.next_power_of_2(K))
    _fused_kernel[(1,)](scores, a, h, q, B, K, *scores.stride(), _LOG2E / eps, iters,
                        BLOCK_B=max(1, 4096 // bk), BLOCK_K=bk, num_warps=8)
    return q


@torch.library.custom_op("sgengine::sinkhorn", mutates_args=())
def _sinkhorn_op(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    return _launch(scores, eps, iters)


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
    return _iterate(*_triton_passes(scores, float(eps)), int(iters),
                    reduce=lambda a: _allreduce_lse(a, torch.exp2, torch.log2))
