"""Two-rank k-means, run by tests/test_kmeans.py under
``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_kmeans.py OUT_DIR``.

Each rank trains on its (uneven) shard of the data sets in :func:`cases` and saves its centroids,
objective and the ids of its shard to OUT_DIR/rank{r}.pt; the test compares them with
single-process training on the concatenated data.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

NITER = 8
SEED = 3


def cases() -> dict:
    """name -> (x (N, d), k, KMeans keyword arguments); deterministic."""
    g = torch.Generator().manual_seed(1234)
    centers = 6.0 * torch.randn(6, 8, generator=g)
    blobs = centers[torch.arange(301) % 6] + torch.randn(301, 8, generator=g)
    # 5 distinct points, 8 clusters: empty clusters and tied distances every iteration. Small
    # integers keep every distance exact (0 for duplicates), so the tie rules alone decide which
    # rows re-seed the empty clusters, however each process blocks its matmuls.
    duplicates = torch.randint(-3, 4, (5, 4), generator=g).float()[torch.arange(97) % 5]
    return {
        "blobs": (blobs, 6, {}),
        "spherical": (blobs, 4, {"spherical": True}),
        "duplicates": (duplicates, 8, {}),
    }


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Uneven contiguous shards in rank order (rank 0 gets the smaller one)."""
    cuts = [0] + [(n * (r + 1)) // world - (world - 1 - r) * 7 for r in range(world - 1)] + [n]
    return cuts[rank], cuts[rank + 1]


def main(out_dir: str) -> None:
    from sgengine.annotate.kmeans import KMeans

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name, (x, k, kw) in cases().items():
        lo, hi = shard_bounds(len(x), rank, world)
        km = KMeans(x.shape[1], k, niter=NITER, seed=SEED, backend="torch", **kw).train(x[lo:hi])
        results[name] = {"centroids": km.centroids, "objective": km.objective,
                         "ids": km.assign(x[lo:hi])[0], "rows": (lo, hi)}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
