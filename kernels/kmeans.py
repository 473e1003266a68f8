"""Fused k-means assignment: nearest centroid and squared distance, never writing N x K.

For rows x_i (N, d) and centroids c_k (K, d):

    ids[i]     = argmin_k ||x_i - c_k||^2                      (N,) int64, ties -> lowest k
    sq_dist[i] = max(||x_i||^2 - 2 x_i . c_k + ||c_k||^2, 0)   (N,) float32, at k = ids[i]

The distance matrix is the GEMM x c^T plus rank-1 terms, so the fast design (SPEC section 5) is a
GEMM whose epilogue is a running min over centroid blocks:

* ``_assign_kernel``: one program per block of rows loops over centroid blocks; per block it
  accumulates x . c with ``tl.dot`` over chunks of d (fp32 accumulator), forms
  score = ||c||^2 - 2 x . c (||x||^2 is constant per row, so it is added once at the end) and
  folds the block's min / argmin into registers. Memory: O(N + K) besides the inputs.
* Precision: 16-bit inputs go to the tensor cores as they are (their products are exact in the
  fp32 accumulator); fp32 inputs use exact fp32 (``input_precision="ieee"``), not TF32, so fp32
  assignments agree with an exact argmin. Centroids are cast to x's dtype, and ||c||^2 and
  ||x||^2 are computed in fp32 from the values the dot product sees, so sq_dist is the fp32
  distance between x and the cast centroids.

Non-finite inputs are reported after the fact, almost for free: a NaN or Inf in a row of x makes
its sq_dist non-finite, so the (N,) output and the (K, d) centroids are checked, never the (N, d)
input.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import check_same_device, interpreter_on, resolve_backend

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The torch path materialises (rows x K) fp32 scores: this many elements (256 MB) per chunk.
_TORCH_CHUNK_ELEMENTS = 1 << 26


@triton.jit
def _row_sq_norms(x_rows, row_ok, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """||x||^2 in fp32 of the BLOCK_N rows at ``x_rows`` (row pointers, unit stride along d)."""
    offs_d = tl.arange(0, BLOCK_D)
    xnorm = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + offs_d) < D
        x = tl.load(x_rows + d0 + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        x = x.to(tl.float32)
        xnorm += tl.sum(x * x, axis=1)
    return xnorm


@triton.jit
def _assign_kernel(X, C, Cnorm, Ids, Dist, N, K, D, stride_x, stride_c,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One program per BLOCK_N rows: running (min, argmin) of ||c||^2 - 2 x.c over all K."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # int64 row offsets: N * d passes 2^31 at realistic sizes (e.g. 4M x 768).
    x_rows = X + rows.to(tl.int64)[:, None] * stride_x
    offs_d = tl.arange(0, BLOCK_D)
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_id = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        c_rows = C + cols.to(tl.int64)[:, None] * stride_c
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_ok = (d0 + offs_d) < D
            x = tl.load(x_rows + d0 + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            c = tl.load(c_rows + d0 + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            # UPCAST: the Triton interpreter multiplies bfloat16 operands as raw uint16 bits, so
            # there they go through fp32 (exact for bf16 products). Inlined rather than _tl.dot_f32:
            # the interpreter re-patches the language on every nested jit call.
            if UPCAST:
                acc = tl.dot(x.to(tl.float32), tl.trans(c.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(c), acc, input_precision=PRECISION)
        # Padded centroid columns get ||c||^2 = +inf, so they never win. A NaN score (NaN in x)
        # becomes +inf so that the reduction is well defined; that row's sq_dist is NaN anyway
        # (its ||x||^2 is), which the host check reports.
        cn = tl.load(Cnorm + cols, mask=col_ok, other=float("inf"))
        score = cn[None, :] - 2.0 * acc
        score = tl.where(score == score, score, float("inf"))
        blk_best, blk_id = tl.min(score, axis=1, return_indices=True,
                                  return_indices_tie_break_left=True)
        # Strict '<': on a tie the earlier block (lower centroid index) keeps the row.
        better = blk_best < best
        best = tl.where(better, blk_best, best)
        best_id = tl.where(better, blk_id + k0, best_id)
    xnorm = _row_sq_norms(x_rows, row_ok, D, BLOCK_N, BLOCK_D)
    tl.store(Ids + rows, best_id.to(tl.int64), mask=row_ok)
    # propagate_nan: a NaN row must stay NaN through the clamp for the host check to see it.
    sq = tl.maximum(xnorm + best, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(Dist + rows, sq, mask=row_ok)


def _configs(ieee: bool) -> list:
    """Tile shapes to autotune on a GPU: large tiles keep the tensor cores fed at d=384..768;
    exact fp32 runs on the CUDA cores, where smaller tiles do better."""
    if ieee:
        shapes = [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2)]
    else:
        shapes = [(128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3), (256, 128, 8, 3),
                  (64, 128, 4, 4), (128, 64, 4, 4), (64, 256, 8, 3)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in shapes]


# The autotuners key on K and d (and, implicitly, on the dtypes): N changes from chunk to chunk.
_assign_tuned_ieee = triton.autotune(_configs(True), key=["K", "D"])(_assign_kernel)
_assign_tuned_lowp = triton.autotune(_configs(False), key=["K", "D"])(_assign_kernel)


def _check_inputs(x: torch.Tensor, centroids: torch.Tensor) -> None:
    """Raise a clear error unless x: (N, d) and centroids: (K, d), float, N, K, d >= 1, one device."""
    for name, rows, t in (("x", "N", x), ("centroids", "K", centroids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}: "
                            f"wrap it with torch.as_tensor({name})")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D ({rows}, d), got shape {tuple(t.shape)}: "
                             f"flatten features first, e.g. {name}.reshape(len({name}), -1)")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}: "
                            f"cast it, e.g. {name}.float()")
        if t.shape[0] == 0:
            raise ValueError(f"{name} is empty ({rows}=0): pass at least one row")
    if x.shape[1] != centroids.shape[1]:
        raise ValueError(f"feature sizes differ: x has d={x.shape[1]}, centroids d={centroids.shape[1]}; "
                         "train the centroids on features of the same size")
    if x.shape[1] == 0:
        raise ValueError("features are empty (d=0): pass at least one feature per row")
    check_same_device(x=x, centroids=centroids)


def _prepare(x: torch.Tensor, centroids: torch.Tensor):
    """Cast centroids to x's dtype (what the dot product sees) and take fp32 ||c||^2 of that."""
    c = centroids.to(x.dtype).contiguous()
    return c, c.float().square().sum(dim=1)


def _raise_if_nonfinite(x: torch.Tensor, centroids: torch.Tensor, sq_dist: torch.Tensor) -> None:
    """One host sync for the (N,) output and the (K, d) centroids (a NaN centroid never wins, so
    it would otherwise go unnoticed); x is only inspected to word the error."""
    if bool(torch.isfinite(sq_dist).all() & torch.isfinite(centroids).all()):
        return
    if not bool(torch.isfinite(centroids).all()):
        raise ValueError("centroids contain NaN or Inf: re-initialise them (e.g. retrain KMeans)")
    bad = (~torch.isfinite(x).all(dim=1)).nonzero().flatten()
    if bad.numel():
        raise ValueError(f"x contains NaN or Inf in {bad.numel()} row(s) (first: row {int(bad[0])}): "
                         "drop or impute them first, e.g. x = x[torch.isfinite(x).all(dim=1)]")
    raise ValueError("squared distances overflow float32: scale the features down (e.g. L2-normalise)")


def kmeans_assign_ref(x: torch.Tensor, centroids: torch.Tensor, backend: str = "auto"):
    """Materialised PyTorch reference of :func:`kmeans_assign` (same shapes, dtypes and ties).

    Computes the full (N, K) fp32 score matrix from the same values the kernel sees (x and
    centroids cast to x's dtype, then to fp32). ``backend`` is accepted for a common signature
    and ignored. Memory O(N * K).
    """
    _check_inputs(x, centroids)
    c, cnorm = _prepare(x, centroids)
    xf = x.float()
    # torch.min over a dim returns the first minimal index: ties go to the lowest k, as the kernel.
    best, ids = (cnorm[None, :] - 2.0 * (xf @ c.float().T)).min(dim=1)
    sq_dist = (xf.square().sum(dim=1) + best).clamp_min(0.0)
    _raise_if_nonfinite(x, centroids, sq_dist)
    return ids, sq_dist


def _assign_torch(x: torch.Tensor, centroids: torch.Tensor):
    """The reference, a bounded number of rows at a time so that rows x K stays ~256 MB."""
    step = max(1, _TORCH_CHUNK_ELEMENTS // centroids.shape[0])
    if x.shape[0] <= step:
        return kmeans_assign_ref(x, centroids)
    parts = [kmeans_assign_ref(x[i:i + step], centroids) for i in range(0, x.shape[0], step)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _launch(x: torch.Tensor, c: torch.Tensor, cnorm: torch.Tensor):
    """Run ``_assign_kernel`` on prepared inputs; returns (ids int64 (N,), sq_dist fp32 (N,))."""
    N, D = x.shape
    K = c.shape[0]
    ids = torch.empty(N, dtype=torch.int64, device=x.device)
    sq_dist = torch.empty(N, dtype=torch.float32, device=x.device)
    ieee = x.dtype == torch.float32
    # tl.dot needs inner dims >= 16; exact fp32 on the CUDA cores prefers a shorter d step.
    block_d = min(32 if ieee and not interpreter_on() else 64, max(16, triton.next_power_of_2(D)))
    args = (x, c, cnorm, ids, sq_dist, N, K, D, x.stride(0), c.stride(0))
    meta = dict(BLOCK_D=block_d, PRECISION="ieee" if ieee else "tf32",
                UPCAST=interpreter_on() and x.dtype == torch.bfloat16)
    if interpreter_on():  # fixed tiles: autotuning under the interpreter is pointless
        _assign_kernel[(triton.cdiv(N, 128),)](*args, BLOCK_N=128, BLOCK_K=64, num_stages=1, **meta)
    else:
        tuned = _assign_tuned_ieee if ieee else _assign_tuned_lowp
        tuned[lambda m: (triton.cdiv(N, m["BLOCK_N"]),)](*args, **meta)
    return ids, sq_dist


@torch.library.custom_op("sgengine::kmeans_assign", mutates_args=())
def _kmeans_assign_op(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.stride(1) != 1:  # the kernel assumes unit stride along d
        x = x.contiguous()
    c, cnorm = _prepare(x, centroids)
    ids, sq_dist = _launch(x, c, cnorm)
    _raise_if_nonfinite(x, centroids, sq_dist)
    return ids, sq_dist


@_kmeans_assign_op.register_fake
def _(x, centroids):
    n = x.shape[0]
    return x.new_empty((n,), dtype=torch.int64), x.new_empty((n,), dtype=torch.float32)


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, backend: str = "auto"):
    """Nearest centroid of every row, fused (no N x K matrix on the Triton path).

    Args:
        x: (N, d) float32, bfloat16 or float16 (any row stride).
        centroids: (K, d), any of those dtypes, same device; cast to x's dtype for the dot
            product. K > N is fine.
        backend: "auto" (Triton on CUDA, PyTorch on CPU), "triton" or "torch".

    Returns:
        ids: (N,) int64 in [0, K), the nearest centroid; ties go to the lowest index.
        sq_dist: (N,) float32, ||x_i - c_ids[i]||^2 (expanded form, clamped at 0).

    Raises:
        ValueError / TypeError for wrong dims, mismatched d, empty inputs, unsupported dtypes,
        and for NaN or Inf in x or centroids (naming the fix).
    """
    _check_inputs(x, centroids)
    if resolve_backend(backend, x, centroids) == "torch":
        return _assign_torch(x, centroids)
    return _kmeans_assign_op(x, centroids)
