"""Fused k-means assignment: nearest centroid and squared distance, never writing N x K.

For rows x_i (N, d) and centroids c_k (K, d):

    ids[i]     = argmin_k ||x_i - c_k||^2                      (N,) int64, ties -> lowest k
    sq_dist[i] = max(||x_i||^2 - 2 x_i . c_k + ||c_k||^2, 0)   (N,) float32, at k = ids[i]

The distance matrix is the GEMM x c^T plus rank-1 terms, so the fast design (SPEC section 5) is a
GEMM whose epilogue is a running min over centroid blocks:

* ``_assign_kernel`` (in ``_kmeans_triton``, imported only when the Triton path runs): one
  program per block of rows loops over centroid blocks; per block it accumulates x . c with
  ``tl.dot`` over chunks of d (fp32 accumulator), forms score = ||c||^2 - 2 x . c (||x||^2 is
  constant per row, so it is added once at the end) and folds the block's min / argmin into
  registers. Memory: O(N + K) besides the inputs.
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

from ._backend import check_same_device, resolve_backend

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The torch path materialises (rows x K) fp32 scores: this many elements (256 MB) per chunk.
_TORCH_CHUNK_ELEMENTS = 1 << 26


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


@torch.library.custom_op("sgengine::kmeans_assign", mutates_args=())
def _kmeans_assign_op(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.stride(1) != 1:  # the kernel assumes unit stride along d
        x = x.contiguous()
    from ._kmeans_triton import launch  # triton is imported by the Triton path only

    c, cnorm = _prepare(x, centroids)
    ids, sq_dist = launch(x, c, cnorm)
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
