"""Triton path of :func:`sgengine.kernels.kmeans.kmeans_assign` (imported only when it runs).

``_assign_kernel``: one program per BLOCK_N rows loops over centroid blocks; per block it
accumulates x . c with ``tl.dot`` over chunks of d (fp32 accumulator), forms
score = ||c||^2 - 2 x . c (||x||^2 is constant per row, so it is added once at the end) and folds
the block's (min, argmin) into two (BLOCK_N,) registers.

Register budget (what decides spills, checked per target by ``python -m sgengine.kernels.audit``):
the fp32 accumulator holds BLOCK_N * BLOCK_K / threads values a thread; everything else must stay
small beside it. So the tiles are addressed from a scalar base pointer that advances along d and
over centroid blocks plus an int32 offset tile that never changes (one register an element,
where a tile of 64-bit pointers costs two and is re-derived every block), and the argmin is two
plain reductions (min, then the lowest column that reaches it) rather than a reduction that
carries an index tile beside the scores.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import interpreter_on


@triton.jit
def _row_sq_norms(X, offs, row_ok, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 ||x||^2 of a block of rows: X points at the block, offs = row * stride + d (int32)."""
    xnorm = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + tl.arange(0, BLOCK_D)) < D
        x = tl.load(X + d0 + offs, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        xnorm += tl.sum(x * x, axis=1)
    return xnorm


@triton.jit
def _block_scores(X, C, x_offs, c_offs, row_ok, col_ok, D, acc,
                  BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + x c^T for one (row block, centroid block) pair, over all of d in BLOCK_D chunks."""
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + tl.arange(0, BLOCK_D)) < D
        x = tl.load(X + d0 + x_offs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        c = tl.load(C + d0 + c_offs, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        # UPCAST: the Triton interpreter multiplies bfloat16 operands as raw uint16 bits, so there
        # they go through fp32 (exact for bf16 products).
        if UPCAST:
            acc = tl.dot(x.to(tl.float32), c.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, c, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _assign_kernel(X, C, Cnorm, Ids, Dist, N, K, D, stride_x, stride_c,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One program per BLOCK_N rows: running (min, argmin) of ||c||^2 - 2 x.c over all K."""
    row0 = tl.program_id(0) * BLOCK_N
    rows = tl.arange(0, BLOCK_N)
    row_ok = row0 + rows < N
    # int64 only in the scalar base: N * d passes 2^31 at realistic sizes (e.g. 4M x 768).
    Xb = X + row0.to(tl.int64) * stride_x
    x_offs = rows[:, None] * stride_x + tl.arange(0, BLOCK_D)[None, :]
    c_offs = tl.arange(0, BLOCK_K)[None, :] * stride_c + tl.arange(0, BLOCK_D)[:, None]  # c^T
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_id = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        acc = _block_scores(Xb, C + tl.cast(k0, tl.int64) * stride_c, x_offs, c_offs, row_ok, col_ok, D,
                            tl.zeros([BLOCK_N, BLOCK_K], tl.float32), BLOCK_D, PRECISION, UPCAST)
        # Padded centroid columns get ||c||^2 = +inf, so they never win. A NaN score (NaN in x)
        # becomes +inf so that the reduction is well defined; that row's sq_dist is NaN anyway
        # (its ||x||^2 is), which the host check reports.
        score = tl.load(Cnorm + cols, mask=col_ok, other=float("inf"))[None, :] - 2.0 * acc
        score = tl.where(score == score, score, float("inf"))
        blk_best = tl.min(score, axis=1)
        # The lowest column at the block's minimum: ties go to the lowest index.
        blk_id = tl.min(tl.where(score == blk_best[:, None], cols[None, :], K), axis=1)
        # Strict '<': on a tie the earlier block (lower centroid index) keeps the row.
        better = blk_best < best
        best = tl.where(better, blk_best, best)
        best_id = tl.where(better, blk_id, best_id)
    xnorm = _row_sq_norms(Xb, x_offs, row_ok, D, BLOCK_N, BLOCK_D)
    tl.store(Ids + row0 + rows, best_id.to(tl.int64), mask=row_ok)
    # propagate_nan: a NaN row must stay NaN through the clamp for the host check to see it.
    sq = tl.maximum(xnorm + best, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(Dist + row0 + rows, sq, mask=row_ok)


def _configs(ieee: bool, aligned: bool) -> list:
    """Tile shapes to autotune on a GPU, each spill-free on sm_80/86/89/90.

    16-bit inputs: 128 x 128 tiles keep the tensor cores fed at d = 384..768, deep cp.async
    pipelines hide the loads. Exact fp32 runs on the CUDA cores (FMA), whose operands for a whole
    BLOCK_D slice sit in registers beside the accumulator: smaller tiles. Rows that are not
    16-byte aligned (d % 16 != 0) load element by element with an address each, so there d goes
    in shorter chunks."""
    if ieee:
        shapes = [(64, 64, 16, 4, 3), (64, 64, 32, 8, 2)] if aligned else [(64, 64, 32, 8, 2)]
    elif aligned:
        shapes = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4)]
    else:
        shapes = [(128, 128, 16, 8, 2)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=s)
            for bn, bk, bd, w, s in shapes]


# One autotuner per (fp32?, aligned?), keyed on K and d (and, implicitly, on the dtypes): N
# changes from chunk to chunk.
_TUNED = {(ieee, aligned): triton.autotune(_configs(ieee, aligned), key=["K", "D"])(_assign_kernel)
          for ieee in (True, False) for aligned in (True, False)}


def _aligned(x: torch.Tensor) -> bool:
    """Whether Triton specialises x's rows as 16-byte aligned (it checks divisibility by 16).
    Read from the storage offset (allocations are aligned), so that fake tensors answer too."""
    offset_bytes = x.storage_offset() * x.element_size()
    return x.shape[1] % 16 == 0 and x.stride(0) % 16 == 0 and offset_bytes % 16 == 0


def launch(x: torch.Tensor, c: torch.Tensor, cnorm: torch.Tensor):
    """Run ``_assign_kernel`` on prepared inputs (x (N, d) unit stride along d, c (K, d) in x's
    dtype, contiguous; cnorm (K,) fp32); returns (ids int64 (N,), sq_dist fp32 (N,))."""
    N, D = x.shape
    K = c.shape[0]
    ids = torch.empty(N, dtype=torch.int64, device=x.device)
    sq_dist = torch.empty(N, dtype=torch.float32, device=x.device)
    ieee = x.dtype == torch.float32
    args = (x, c, cnorm, ids, sq_dist, N, K, D, x.stride(0), c.stride(0))
    meta = dict(PRECISION="ieee" if ieee else "tf32",
                UPCAST=interpreter_on() and x.dtype == torch.bfloat16)
    if interpreter_on():  # fixed tiles: autotuning under the interpreter is pointless
        # tl.dot needs inner dims >= 16.
        block_d = min(64, max(16, triton.next_power_of_2(D)))
        _assign_kernel[(triton.cdiv(N, 128),)](*args, BLOCK_N=128, BLOCK_K=64, BLOCK_D=block_d,
                                               num_stages=1, **meta)
    else:
        _TUNED[ieee, _aligned(x)][lambda m: (triton.cdiv(N, m["BLOCK_N"]),)](*args, **meta)
    return ids, sq_dist
