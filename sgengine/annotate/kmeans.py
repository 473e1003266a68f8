"""k-means for self-labels (SPEC section 1: Euclidean k-means, 30 iterations, K up to ~10k).

Lloyd's algorithm with these choices:

* Assignment: on CUDA (backend "auto" / "triton") :func:`sgengine.kernels.kmeans.kmeans_assign`
  per chunk of rows, a fused GEMM + running argmin that never writes N x K. Backend "auto" on
  the CPU uses faiss's ``IndexFlatL2.search`` where faiss is installed: its speed rests on the
  BLAS faiss ships for the host, while torch's BLAS varies (MKL on an AMD EPYC: 2.6x faiss's
  time, issue 21). Backend "torch" (and "auto" without faiss) runs
  :func:`~sgengine.annotate.kmeans_torch.assign_blocked`: a blocked ``addmm`` whose cache-sized
  score block is reduced by ``min`` at once, ||x||^2 computed once per run; memory O(N + K d).
  Data is assigned in its own dtype: pass bfloat16 features for the fast tensor-core path.
* Update, deterministic: on CUDA, per chunk, ids are sorted (stable), rows gathered in that order
  as fp32, and summed with ``torch.segment_reduce`` in two levels (pieces of at most 64 rows,
  then the pieces of each cluster), a fixed order with no float atomics, so the same input gives
  the same centroids bit for bit. On the CPU ``index_add_`` adds rows in index order (also
  deterministic, 6x faster than the sort). Partial sums are accumulated in float64.
* Init: greedy k-means++ (2007, Sec. 5; scikit-learn's variant) with 3 (2 + ln K)
  D^2-sampled candidates a step, the one that lowers the potential most kept, on a random sample
  of min(N, max(8192, 8 K)) rows. The candidate count, not the sample, decides whether every
  separated blob gets a centroid: on 50 blobs (N=20k, d=64, 100 seeds) sklearn's 2 + ln K = 5
  covers all 50 in 80 seeds on every row; 15 candidates in 98 on every row, 100 on 8192 rows,
  99 on 3200. A miss costs ~1.45x the inertia and Lloyd never repairs it. Each step reads the
  sample once, an (m, d) x (d, trials) GEMM, so the init costs 2 m d K trials FLOPs: at N=1M,
  K=10k, d=128 (m = 80k, 33 trials) 6.8 TFLOPs, a quarter of sklearn's init on all rows with
  11 trials, a tenth of 30 Lloyd iterations (77 TFLOPs); 30 of its steps timed on one busy CPU
  core: 170 ms each (4 GFLOP/s), 28 min for all 10k; a GPU at ~50 TFLOP/s fp32 needs ~0.1 ms a
  step (estimate, launch-bound), ~1 s. More rows a cluster buy little
  coverage for their cost: at N=100k, d=128, K=1000 the init on 16 K rows took 0.30x faiss's
  whole 20-iteration train, on 8 K rows 0.11x (2 cores busy with other jobs, 2026-12-04).
  All randomness comes from a CPU ``torch.Generator`` seeded with ``seed`` (uniforms are drawn
  up front and D^2 sampling uses inverse-CDF ``searchsorted``, so there is no per-step host sync).
* Empty clusters are re-seeded with the points farthest from their centroid (ties: lowest global
  row), moving each out of its old cluster as scikit-learn does, so the objective never rises.
* Multi-process: when ``torch.distributed`` is initialised each rank passes its own shard (rank
  order = row order of the concatenated data). Gather-free: the init sample is drawn over global
  row indices with the same generator on every rank, each rank fills the sample rows it owns and
  one all_reduce(SUM) of the zero-padded buffer assembles it exactly (x + 0 = x); per-cluster sums
  (float64) and counts are all-reduced; far points for re-seeding are merged from each rank's
  top candidates. Centroids therefore equal single-process centroids on the concatenated data
  up to float64 summation order (bitwise when shards align with chunks).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from ..common.ranks import world_size
from ..kernels import kmeans_assign, resolve_backend

from .kmeans_torch import (assign_blocked, check_finite, greedy_kmeanspp, index_sums, local_trials,
                           sq_norms)

BACKENDS = ("auto", "triton", "torch", "faiss")
_PIECE_ROWS = 64  # first-level segment length: bounds the serial work of one sum
_INIT_ROWS_PER_CLUSTER = 8  # greedy k-means++ sample: min(N, max(8192, 8 K)) rows
_INIT_MIN_ROWS = 8192


class _Group:
    """The process group as k-means sees it: world size, rank, this rank's global row offset."""

    def __init__(self, n_local: int, device: torch.device):
        self.world = world_size()
        self.rank = dist.get_rank() if self.world > 1 else 0
        sizes = self.all_gather(torch.tensor([n_local], dtype=torch.int64, device=device))
        self.offset = int(sizes[:self.rank].sum())
        self.n_total = int(sizes.sum())

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shape tensors of all ranks along dim 0, in rank order."""
        if self.world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t)
        return torch.cat(parts)


def _gather_rows(group: _Group, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` (global row indices) of the concatenated ``t``, on every rank.

    Float rows come back as float32, integer rows as int64: each rank writes the rows it owns into
    a zero buffer and a sum all-reduce assembles them exactly.
    """
    dtype = torch.float32 if t.is_floating_point() else torch.int64
    local = idx - group.offset
    own = (local >= 0) & (local < t.shape[0])
    out = torch.zeros((idx.numel(),) + tuple(t.shape[1:]), dtype=dtype, device=t.device)
    out[own] = t[local[own]].to(dtype)
    return group.sum_(out)


def _piece_lengths(counts: torch.Tensor):
    """Split each cluster's run of sorted rows into pieces of <= _PIECE_ROWS rows.

    Returns (lengths of all pieces in sorted order, number of pieces per cluster)."""
    pieces = (counts + _PIECE_ROWS - 1) // _PIECE_ROWS
    cluster = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), pieces)
    first = torch.cumsum(pieces, 0) - pieces
    j = torch.arange(cluster.numel(), device=counts.device) - first[cluster]
    return (counts[cluster] - j * _PIECE_ROWS).clamp_(max=_PIECE_ROWS), pieces


def _segment_sums(rows: torch.Tensor, ids: torch.Tensor, k: int):
    """Per-cluster sums (k, d) float32 and counts (k,) int64, summed in a fixed order."""
    counts = torch.bincount(ids, minlength=k)  # integer atomics: exact in any order
    order = torch.argsort(ids, stable=True)
    sorted_rows = rows.index_select(0, order).float()
    lengths, pieces = _piece_lengths(counts)
    # Two levels keep every serial sum short (<= 64 rows, then <= N / 64 pieces) and balanced.
    partial = torch.segment_reduce(sorted_rows, "sum", lengths=lengths, axis=0, unsafe=True)
    return torch.segment_reduce(partial, "sum", lengths=pieces, axis=0, unsafe=True), counts


def _farthest(group: _Group, sq_dist: torch.Tensor, e: int) -> torch.Tensor:
    """Global row indices (e,) of the e largest distances over all ranks; ties -> lowest row."""
    vals, idx = torch.sort(sq_dist, descending=True, stable=True)
    vals, idx = vals[:e], idx[:e] + group.offset
    if group.world == 1:
        return idx
    pad = e - vals.numel()  # a short shard pads with -inf so every rank sends e candidates
    vals = F.pad(vals, (0, pad), value=float("-inf"))
    idx = F.pad(idx, (0, pad), value=-1)
    vals, idx = group.all_gather(vals), group.all_gather(idx)
    # Candidates arrive in rank order = global row order, so a stable sort keeps ties lowest-first.
    return idx[torch.sort(vals, descending=True, stable=True).indices[:e]]


def _check_data(x, d: int | None = None) -> torch.Tensor:
    """Validate (N, d) float features; float64 becomes float32."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}: use torch.as_tensor(x)")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (N, d), got shape {tuple(x.shape)}: "
                         "flatten features first, e.g. x.reshape(len(x), -1)")
    if not x.is_floating_point():
        raise TypeError(f"x must hold floats, got {x.dtype}: cast it, e.g. x.float()")
    if d is not None and x.shape[1] != d:
        raise ValueError(f"x has d={x.shape[1]} features but this KMeans was built with d={d}")
    return x.float() if x.dtype == torch.float64 else x


class KMeans:
    """Lloyd k-means with k-means++ init, deterministic updates, chunking and multi-process.

    Args:
        d: feature size. k: number of clusters. niter: Lloyd iterations (SPEC: 30).
        spherical: L2-normalise the data and the centroids (centroids come back unit norm).
        seed: seeds the CPU generator behind the k-means++ init (same seed, same centroids).
        backend: "auto" | "triton" | "torch" for the assignment, or "faiss" (training only,
            single process, needs ``pip install faiss-cpu``; faiss's own random init). "auto":
            Triton on CUDA; on the CPU faiss's ``IndexFlatL2.search`` where faiss is installed
            (as fast as faiss on every host), else the blocked torch path ("torch").
        chunk_size: rows per Triton assignment call / CUDA update step; None picks ~1 GB of
            per-chunk temporaries (rows x d fp32). The torch path blocks by cache size itself.
        verbose: show a tqdm progress bar with the objective (rank 0 only).
        max_points_per_centroid: faiss only: train on a random subsample of k times this many
            rows (faiss's own default is 256); None trains on every row.

    Attributes after :meth:`train`: ``centroids`` (k, d) float32 on the data's device;
    ``objective``: mean squared distance over the training rows at each iteration's assignment
    step (non-increasing); ``train_rows``: how many rows that is (all N unless subsampled).
    """

    def __init__(self, d: int, k: int, niter: int = 30, spherical: bool = False, seed: int = 0,
                 backend: str = "auto", chunk_size: int | None = None, verbose: bool = False,
                 max_points_per_centroid: int | None = None):
        if d < 1 or k < 1 or niter < 0:
            raise ValueError(f"need d >= 1, k >= 1, niter >= 0; got d={d}, k={k}, niter={niter}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of rows or None, got {chunk_size}")
        if max_points_per_centroid is not None and (backend != "faiss" or max_points_per_centroid < 1):
            raise ValueError("max_points_per_centroid (>= 1) subsamples with backend='faiss' only; "
                             f"got {max_points_per_centroid} with backend={backend!r}")
        self.d, self.k, self.niter, self.spherical, self.seed = d, k, niter, spherical, seed
        self.backend, self.chunk_size, self.verbose = backend, chunk_size, verbose
        self.max_points_per_centroid = max_points_per_centroid
        self.centroids: torch.Tensor | None = None
        self.objective: list[float] = []
        self.train_rows = 0

    # -- public API -------------------------------------------------------------------------
    def train(self, x: torch.Tensor) -> "KMeans":
        """Fit on x (N, d) float (this rank's shard under torch.distributed); returns self."""
        x = self._prepare(x)
        group = _Group(x.shape[0], x.device)
        self._check_trainable(x, group)
        if self.backend == "faiss":
            return self._train_faiss(x, group)
        self.centroids, self.train_rows = self._init(x, group), group.n_total
        x_sq = sq_norms(x) if self._assign_path(x) == "torch" else None  # ||x||^2 once per run
        objective = []
        bar = tqdm(range(self.niter), desc=f"k-means K={self.k}",
                   disable=not self.verbose or group.rank != 0)
        for _ in bar:
            objective.append(self._lloyd(x, group, x_sq))
            if self.verbose:
                bar.set_postfix(objective=f"{objective[-1].item():.5g}")
        self.objective = torch.stack(objective).tolist() if objective else []
        return self

    def assign(self, x: torch.Tensor):
        """Nearest centroid ids (N,) int64 and squared distances (N,) float32 of x (N, d)."""
        if self.centroids is None:
            raise RuntimeError("KMeans.assign before train: call km.train(x) first")
        return self._assign_chunks(self._prepare(x))

    def lloyd_step(self, x: torch.Tensor) -> torch.Tensor:
        """One Lloyd iteration (assign, update, re-seed) on x prepared as in training
        (already L2-normalised when spherical); returns the mean squared distance (0-d)."""
        if self.centroids is None:
            raise RuntimeError("KMeans.lloyd_step before train: call km.train(x) first")
        return self._lloyd(x, _Group(x.shape[0], x.device))

    # -- steps ------------------------------------------------------------------------------
    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_data(x, self.d)
        return F.normalize(x.float(), dim=1).to(x.dtype) if self.spherical else x

    def _check_trainable(self, x: torch.Tensor, group: _Group) -> None:
        if group.n_total == 0 or x.shape[0] == 0:
            raise ValueError("x is empty (N=0): k-means needs at least k rows "
                             "(and at least one row on every rank)")
        if self.k > group.n_total:
            raise ValueError(f"cannot make K={self.k} clusters from N={group.n_total} points: lower k")
        # Every rank raises together, or the others would hang in the next collective.
        bad = group.max_((~torch.isfinite(x)).any().to(torch.int64).reshape(1))
        if bool(bad):
            raise ValueError("x contains NaN or Inf features: drop or impute those rows first, "
                             "e.g. x = x[torch.isfinite(x).all(dim=1)]")

    def _init(self, x: torch.Tensor, group: _Group) -> torch.Tensor:
        """Greedy k-means++ on a seeded sample drawn over global rows (same on all ranks)."""
        gen = torch.Generator().manual_seed(self.seed)
        m = min(group.n_total, max(_INIT_MIN_ROWS, _INIT_ROWS_PER_CLUSTER * self.k))
        rows = torch.randperm(group.n_total, generator=gen)[:m].to(x.device)
        u_first = torch.rand(1, generator=gen, dtype=torch.float64).to(x.device)
        u = torch.rand(self.k - 1, local_trials(self.k), generator=gen, dtype=torch.float64)
        return greedy_kmeanspp(_gather_rows(group, x, rows), u_first, u.to(x.device))

    def _lloyd(self, x: torch.Tensor, group: _Group, x_sq: torch.Tensor | None = None) -> torch.Tensor:
        ids, sq_dist = self._assign_chunks(x, x_sq)
        sums, counts = self._cluster_sums(x, ids, group)
        objective = group.sum_(sq_dist.double().sum().reshape(1))[0] / group.n_total
        self._reseed_empty(x, ids, sq_dist, sums, counts, group)
        self.centroids = self._new_centroids(sums, counts)
        return objective

    def _chunk_rows(self, x: torch.Tensor) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        return max(1, (1 << 30) // (4 * self.d))

    def _assign_backend(self) -> str:
        return "auto" if self.backend == "faiss" else self.backend

    def _assign_path(self, x: torch.Tensor) -> str:
        """"kernel" (Triton), "torch" (blocked addmm) or "faiss" (CPU, backend "auto", faiss found)."""
        backend = self._assign_backend()
        if resolve_backend(backend, x) != "torch":
            return "kernel"
        return "faiss" if backend == "auto" and _faiss() is not None else "torch"

    def _assign_chunks(self, x: torch.Tensor, x_sq: torch.Tensor | None = None):
        path = self._assign_path(x)
        if path == "faiss":
            return _assign_faiss(_faiss(), x, self.centroids)
        if path == "torch":
            return assign_blocked(x, self.centroids, x_sq)
        step, c, backend = self._chunk_rows(x), self.centroids, self._assign_backend()
        if x.shape[0] <= step:
            return kmeans_assign(x, c, backend=backend)
        parts = [kmeans_assign(x[i:i + step], c, backend=backend) for i in range(0, x.shape[0], step)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _cluster_sums(self, x: torch.Tensor, ids: torch.Tensor, group: _Group):
        """All-reduced per-cluster sums (k, d) float64 and counts (k,) int64."""
        if not x.is_cuda:
            sums, counts = index_sums(x, ids, self.k)
            return group.sum_(sums), group.sum_(counts)
        sums = torch.zeros(self.k, self.d, dtype=torch.float64, device=x.device)
        counts = torch.zeros(self.k, dtype=torch.int64, device=x.device)
        step = self._chunk_rows(x)
        for i in range(0, x.shape[0], step):
            s, n = _segment_sums(x[i:i + step], ids[i:i + step], self.k)
            sums += s
            counts += n
        return group.sum_(sums), group.sum_(counts)

    def _reseed_empty(self, x, ids, sq_dist, sums, counts, group: _Group) -> None:
        """Give each empty cluster one of the farthest points, taking it out of its old cluster."""
        empty = (counts == 0).nonzero().flatten()
        if empty.numel() == 0:
            return
        far = _farthest(group, sq_dist, empty.numel())
        points = _gather_rows(group, x, far)
        old = _gather_rows(group, ids, far)
        moved, moved_n = _segment_sums(points, old, self.k)
        sums -= moved.double()
        counts -= moved_n
        sums[empty] = points.double()
        counts[empty] = 1

    def _new_centroids(self, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Cluster means; a cluster left without points keeps its centroid."""
        mean = (sums / counts.clamp(min=1).unsqueeze(1)).float()
        new = torch.where((counts > 0).unsqueeze(1), mean, self.centroids)
        if not self.spherical:
            return new
        norm = new.norm(dim=1, keepdim=True)
        # A mean of unit vectors can vanish (antipodal members): keep the old unit centroid then.
        return torch.where(norm > 1e-12, new / norm.clamp_min(1e-12), self.centroids)

    def _train_faiss(self, x: torch.Tensor, group: _Group) -> "KMeans":
        if group.world > 1:
            raise ValueError("backend='faiss' is single-process: use backend='auto' under torch.distributed")
        try:
            import faiss
        except ImportError as err:
            raise ImportError("backend='faiss' needs faiss: pip install faiss-cpu "
                              "(or use backend='auto')") from err
        # faiss subsamples to k * max_points_per_centroid rows (its default: 256): every row unless asked.
        per = self.max_points_per_centroid or -(-x.shape[0] // self.k)
        km = faiss.Kmeans(self.d, self.k, niter=self.niter, spherical=self.spherical, seed=self.seed,
                          verbose=self.verbose, gpu=x.is_cuda and hasattr(faiss, "StandardGpuResources"),
                          max_points_per_centroid=per)
        km.train(x.detach().float().cpu().numpy())
        self.centroids = torch.from_numpy(km.centroids).to(x.device)
        self.train_rows = min(x.shape[0], self.k * per)
        self.objective = [float(o) / self.train_rows for o in km.obj]  # faiss: sums over its rows
        return self


def _faiss():
    """The faiss module, or None where it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _assign_faiss(faiss, x: torch.Tensor, centroids: torch.Tensor):
    """Nearest centroid ids (N,) int64 and sq_dist (N,) float32 by ``IndexFlatL2.search``.

    Backend "auto" on the CPU: faiss's exhaustive search (a BLAS GEMM per 4096 x 1024 block,
    top-1 by strict ``<``, so ties go to the lowest k as in the torch path) runs on the BLAS faiss
    ships for the host, so assignment keeps pace with faiss whatever BLAS torch brings (issue
    21: on an AMD EPYC with torch's MKL the blocked addmm took 2.6x faiss's time). Centroids are
    cast to x's dtype first, as in every path; faiss uses torch's thread count."""
    c = centroids.to(x.dtype).float().contiguous()
    check_finite(c)  # a NaN centroid never wins faiss's strict < : it would go unnoticed
    index = faiss.IndexFlatL2(c.shape[1])
    index.add(c.numpy())
    faiss.omp_set_num_threads(torch.get_num_threads())
    sq_dist, ids = index.search(x.detach().float().contiguous().numpy(), 1)
    sq_dist, ids = torch.from_numpy(sq_dist[:, 0]).clamp_min_(0.0), torch.from_numpy(ids[:, 0]).long()
    check_finite(sq_dist.masked_fill(ids < 0, float("inf")))  # a NaN row: id -1, FLT_MAX
    return ids, sq_dist


def kmeans(x: torch.Tensor, k: int, **kw):
    """Train :class:`KMeans` on x (N, d); returns (centroids (k, d) float32, ids (N,) int64)."""
    x = _check_data(x)
    km = KMeans(x.shape[1], k, **kw).train(x)
    return km.centroids, km.assign(x)[0]
