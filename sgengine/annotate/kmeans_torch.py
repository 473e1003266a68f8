"""The pure-PyTorch steps of :mod:`sgengine.annotate.kmeans`: blocked assignment, the centroid
sums on the CPU, and greedy k-means++.

* :func:`assign_blocked` is a GEMM with a fused argmin that never holds the N x K distance
  matrix: per block of rows, ``torch.addmm(||c||^2, x, c^T, beta=1, alpha=-2)`` writes the
  (rows, K) scores into one reused buffer small enough to stay in cache, and ``torch.min``
  reduces it at once into the (N,) outputs. ||x||^2 is computed once per training run (it is
  constant per row, so it only enters sq_dist, never the argmin). Memory: O(N + K d).
* :func:`index_sums` sums rows per cluster with ``index_add_`` (CPU: rows are added in index
  order, so the sums are deterministic) in float32 blocks accumulated in float64.
* :func:`greedy_kmeanspp` is greedy k-means++ (Arthur and Vassilvitskii 2007, Sec. 5, as
  scikit-learn): each step draws :func:`local_trials` candidates by D^2 sampling and keeps the
  one that lowers the potential sum_j min_c ||x_j - c||^2 most.
"""
from __future__ import annotations

import contextlib
import math

import torch

_SCORE_BLOCK = 1 << 22  # elements of the (rows, K) fp32 score block: 16 MB, half the L3 cache
_MIN_BLOCK_ROWS = 256  # fewer rows per GEMM leave the BLAS kernel starved
_SUM_ROWS = 8192  # float32 partial sums over at most this many rows, then float64


def sq_norms(x: torch.Tensor) -> torch.Tensor:
    """||x_i||^2 (N,) in float32."""
    return x.float().square().sum(1)


def block_rows(k: int) -> int:
    """Rows per assignment block so that the (rows, K) fp32 score block stays in cache."""
    return max(_MIN_BLOCK_ROWS, _SCORE_BLOCK // max(k, 1))


def assign_blocked(x: torch.Tensor, centroids: torch.Tensor, x_sq: torch.Tensor | None = None):
    """Nearest centroid ids (N,) int64 (ties: lowest k) and squared distances (N,) float32.

    Same contract as ``sgengine.kernels.kmeans_assign``: centroids are cast to x's dtype, the
    products are exact fp32, sq_dist = max(||x||^2 - 2 x.c + ||c||^2, 0). ``x_sq``: ||x||^2 from
    :func:`sq_norms`, passed in by callers that assign the same rows repeatedly."""
    c = centroids.to(x.dtype).float()
    c_sq, c_t = c.square().sum(1), c.t()
    n, step = x.shape[0], block_rows(c.shape[0])
    x_sq = sq_norms(x) if x_sq is None else x_sq
    best = torch.empty(n, dtype=torch.float32, device=x.device)
    ids = torch.empty(n, dtype=torch.int64, device=x.device)
    scores = torch.empty(min(step, n), c.shape[0], dtype=torch.float32, device=x.device)
    for i in range(0, n, step):
        rows = x[i:i + step].float()
        block = scores[:rows.shape[0]]
        torch.addmm(c_sq, rows, c_t, beta=1, alpha=-2, out=block)
        torch.min(block, 1, out=(best[i:i + step], ids[i:i + step]))  # first minimum: lowest k
    sq_dist = best.add_(x_sq).clamp_min_(0.0)
    check_finite(sq_dist)
    return ids, sq_dist


def check_finite(values: torch.Tensor) -> None:
    """Raise, naming the fix, unless ``values`` (distances, centroids) are all finite."""
    if not bool(torch.isfinite(values).all()):
        raise ValueError("k-means assignment met NaN or Inf in x or the centroids: drop or impute "
                         "those rows first, e.g. x = x[torch.isfinite(x).all(dim=1)]")


def index_sums(rows: torch.Tensor, ids: torch.Tensor, k: int):
    """Per-cluster sums (k, d) float64 and counts (k,) int64 with ``index_add_``."""
    with _one_cpu_thread(rows):
        return _index_sums(rows, ids, k)


def _index_sums(rows: torch.Tensor, ids: torch.Tensor, k: int):
    sums = torch.zeros(k, rows.shape[1], dtype=torch.float64, device=rows.device)
    part = torch.empty(k, rows.shape[1], dtype=torch.float32, device=rows.device)
    for i in range(0, rows.shape[0], _SUM_ROWS):
        part.zero_().index_add_(0, ids[i:i + _SUM_ROWS], rows[i:i + _SUM_ROWS].float())
        sums += part
    return sums, torch.bincount(ids, minlength=k)


def local_trials(k: int) -> int:
    """Candidates per greedy k-means++ step: 3 (2 + floor(ln K)), three times scikit-learn's.

    A step misses every uncovered cluster only if all its candidates land in covered ones:
    probability (1 - q)^trials for an uncovered share q of the potential, so tripling the
    trials cubes it (50 blobs: 80 -> 98-100 of 100 seeds cover all; see kmeans.py)."""
    return 3 * (2 + int(math.log(k)))


def greedy_kmeanspp(sample: torch.Tensor, u_first: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Greedy k-means++ on ``sample`` (m, d) float32 -> (k, d) centroids, k = len(u) + 1.

    ``u_first`` (1,) float64 picks the first centroid uniformly; ``u`` (k - 1, trials) float64 are
    the D^2-sampling uniforms of each step: candidate j is the first row whose cumulative
    D^2 exceeds u * sum D^2. Of a step's candidates the one with the least potential
    sum_j min(D_j^2, ||x_j - cand||^2) is kept (ties: the first drawn). All on x's device,
    no host sync. Every row already on a centroid (D = 0): the last row is drawn (a duplicate
    centroid, re-seeded later as an empty cluster)."""
    with _one_cpu_thread(sample):
        return _greedy(sample, u_first, u)


@contextlib.contextmanager
def _one_cpu_thread(t: torch.Tensor):
    """One CPU thread for many small ops: greedy k-means++ (K steps of ~12 small ops) and
    ``index_add_`` (a parallel region per row: 3 s instead of 35 ms for N=100k on 2 busy cores).
    Both are memory-bound, so a second thread costs more in synchronisation than it gives."""
    before = torch.get_num_threads()
    if not t.is_cuda:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _greedy(sample: torch.Tensor, u_first: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    m = sample.shape[0]
    s_sq = sq_norms(sample)
    picks = torch.empty(len(u) + 1, dtype=torch.int64, device=sample.device)
    picks[:1] = (u_first * m).long().clamp_(max=m - 1)
    mind = _sq_dist_to(sample, s_sq, picks[:1])[:, 0]
    for i in range(len(u)):
        cdf = torch.cumsum(mind, 0, dtype=torch.float64)
        cand = torch.searchsorted(cdf, u[i] * cdf[-1], right=True).clamp_(max=m - 1)
        trial = torch.minimum(mind[:, None], _sq_dist_to(sample, s_sq, cand))  # (m, trials)
        best = trial.sum(0, dtype=torch.float64).argmin().reshape(1)
        picks[i + 1:i + 2] = cand[best]
        mind = trial.index_select(1, best)[:, 0]
    return sample[picks]


def _sq_dist_to(sample: torch.Tensor, s_sq: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Squared distances (m, len(rows)) of the sample to its rows ``rows``: the long side of the
    GEMM first, which BLAS runs ~1.4x faster than the transposed (len(rows), m) product."""
    c = sample[rows]
    return torch.addmm(s_sq[:, None], sample, c.t(), beta=1, alpha=-2).add_(s_sq[rows]).clamp_min_(0.0)
