"""Triton path of :func:`sgengine.kernels.sinkhorn.sinkhorn` (imported only when it runs).

The potentials pass over the matrix alternately by columns (``_col_kernel``, one program per
prototype tile, online over all samples) and by rows (``_row_kernel``, one program per sample
block); the last row pass also writes Q. 2 * iters + 1 reads of the scores and one write of Q,
no atomics (deterministic). Small problems run in a single program (``_fused_kernel``), one
launch. Kernels work in base 2 (exp2 is the hardware path): potentials are in log2 units.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import interpreter_on

_LOG2E = 1.4426950408889634


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


def _blocks(B: int, K: int) -> dict:
    """Tile sizes: column tiles of 32 prototypes (a 128-byte line a row in fp32, two full 32-byte
    sectors in 16-bit), so that K=5000 gives 157 programs, over one wave of an H100's 132 SMs
    (64 a tile left 16-bit inputs at 79); row blocks that fill ~2 waves."""
    if interpreter_on():  # the interpreter pays per program and per loop trip, not per element
        return dict(col=(64, 128), row=(min(16, triton.next_power_of_2(B)), 256))
    col_k = 32
    row_b = max(1, min(8, triton.next_power_of_2(B) // 256))
    return dict(col=(4096 // col_k, col_k), row=(row_b, 2048 // row_b))


def passes(scores: torch.Tensor, eps: float):
    """(col, row, assign) launchers for the Sinkhorn loop of ``sinkhorn.py``; potentials in log2
    units."""
    B, K = scores.shape
    scale, cfg = _LOG2E / eps, _blocks(B, K)
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


def fused(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """Single-process Triton Sinkhorn in one program (for small problems)."""
    B, K = scores.shape
    a = torch.empty(K, device=scores.device, dtype=torch.float32)
    h = torch.zeros(B, device=scores.device, dtype=torch.float32)
    q = torch.empty((B, K), device=scores.device, dtype=torch.float32)
    bk = min(256, triton.next_power_of_2(K))
    _fused_kernel[(1,)](scores, a, h, q, B, K, *scores.stride(), _LOG2E / eps, iters,
                        # 2048-element tiles: 4096 spilled 28 B on sm_90 for bfloat16 scores.
                        BLOCK_B=max(1, 2048 // bk), BLOCK_K=bk, num_warps=8)
    return q


