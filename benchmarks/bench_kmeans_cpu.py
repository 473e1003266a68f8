"""CPU k-means on 2 threads: sgengine vs faiss (and scikit-learn for the full train), side by side.

    python -m pytest benchmarks/bench_kmeans_cpu.py --benchmark-only -q     # smoke size (CI)
    SGENGINE_BENCH_FULL=1 python -m pytest benchmarks/bench_kmeans_cpu.py --benchmark-only
    python benchmarks/bench_kmeans_cpu.py --full --repeats 5                # interleaved table

Sizes: N=100k, d=128, K=1000 (issue #14) behind ``SGENGINE_BENCH_FULL=1`` / ``--full``; otherwise
N=3000, d=16, K=30. Cases:

* assignment: sgengine's blocked ``addmm`` + ``min`` (``KMeans.assign``: no N x K matrix) vs
  faiss ``IndexFlatL2.search(x, 1)``, on the same centroids;
* full train, 20 Lloyd iterations: ``KMeans(niter=20).train`` (greedy k-means++ on a
  4 K-row sample) vs ``faiss.Kmeans`` (random init, every row: max_points_per_centroid large
  enough) vs scikit-learn ``KMeans(max_iter=20, n_init=1, tol=0)`` (greedy k-means++ on all rows).

Targets (issue #14): assignment and train within 1.5x of faiss. The script mode runs the providers
round-robin and keeps each one's fastest repeat, so that a shared, busy machine hurts all alike.
"""
from __future__ import annotations

import argparse
import os
import time

import pytest
import torch
from benchlib import best_seconds

from sgengine.annotate.kmeans import KMeans

FULL = (100_000, 128, 1000)
SMOKE = (3000, 16, 30)
NITER = 20
THREADS = 2
SHAPE = FULL if os.environ.get("SGENGINE_BENCH_FULL", "0") not in ("", "0") else SMOKE


def make_data(n: int, d: int, k: int):
    """x (n, d) float32 around k hidden centres (noise larger than their spread), k rows as centroids."""
    g = torch.Generator().manual_seed(0)
    centres = 0.5 * torch.randn(k, d, generator=g)
    x = centres[torch.randint(0, k, (n,), generator=g)] + torch.randn(n, d, generator=g)
    return x, x[torch.randperm(n, generator=g)[:k]].clone()


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:
        import faiss
        faiss.omp_set_num_threads(n)
    except ImportError:
        pass


def assigner(provider: str, x: torch.Tensor, c: torch.Tensor):
    """A 0-argument function assigning every row of x to c."""
    if provider == "sgengine":
        km = KMeans(x.shape[1], c.shape[0])
        km.centroids = c
        return lambda: km.assign(x)
    faiss = pytest.importorskip("faiss")
    index, xn = faiss.IndexFlatL2(x.shape[1]), x.numpy()
    index.add(c.numpy())
    return lambda: index.search(xn, 1)


def trainer(provider: str, x: torch.Tensor, k: int):
    """A 0-argument function training k-means (NITER iterations) on x from scratch."""
    if provider == "sgengine":
        return lambda: KMeans(x.shape[1], k, niter=NITER, seed=0).train(x)
    if provider == "faiss":
        faiss = pytest.importorskip("faiss")
        xn, per = x.numpy(), -(-x.shape[0] // k)
        return lambda: faiss.Kmeans(x.shape[1], k, niter=NITER, seed=0, max_points_per_centroid=per).train(xn)
    from sklearn.cluster import KMeans as SKMeans
    xn = x.numpy()
    return lambda: SKMeans(k, max_iter=NITER, n_init=1, tol=0.0, random_state=0).fit(xn)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    set_threads(THREADS)
    yield
    set_threads(before)


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("provider", ["sgengine", "faiss"])
def test_cpu_assignment(benchmark, provider):
    n, d, k = SHAPE
    x, c = make_data(n, d, k)
    fn = assigner(provider, x, c)
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    best = best_seconds(benchmark)
    benchmark.extra_info.update(device=f"cpu, {THREADS} threads", provider=provider, N=n, d=d, K=k, best_s=best,
                                tflop_per_s=2 * n * k * d / best / 1e12 if best else None)


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("provider", ["sgengine", "faiss", "sklearn"])
def test_cpu_train(benchmark, provider):
    n, d, k = SHAPE
    if provider == "sklearn" and SHAPE == FULL and os.environ.get("SGENGINE_BENCH_SKLEARN", "1") == "0":
        pytest.skip("SGENGINE_BENCH_SKLEARN=0: sklearn's full-size train (~40 s) skipped")
    x, _ = make_data(n, d, k)
    fn = trainer(provider, x, k)
    benchmark.pedantic(fn, rounds=2 if SHAPE == FULL else 3, warmup_rounds=0)
    benchmark.extra_info.update(device=f"cpu, {THREADS} threads", provider=provider, N=n, d=d, K=k,
                                best_s=best_seconds(benchmark), niter=NITER)


def interleaved(fns: dict, repeats: int) -> dict:
    """Fastest of ``repeats`` runs per provider, the providers taking turns each round."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="N=100k, d=128, K=1000 (else the smoke size)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sklearn-repeats", type=int, default=1, help="sklearn's train is slow: fewer repeats")
    args = p.parse_args()
    n, d, k = FULL if args.full else SMOKE
    set_threads(THREADS)
    x, c = make_data(n, d, k)
    assign = interleaved({q: assigner(q, x, c) for q in ("sgengine", "faiss")}, args.repeats)
    train = interleaved({q: trainer(q, x, k) for q in ("sgengine", "faiss")}, args.repeats)
    train["sklearn"] = float("nan")
    if args.sklearn_repeats:
        train.update(interleaved({"sklearn": trainer("sklearn", x, k)}, args.sklearn_repeats))
    print(f"N={n}, d={d}, K={k}, {THREADS} threads, fastest of {args.repeats} interleaved runs, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| what | sgengine | faiss | sklearn | sgengine / faiss |\n| --- | --- | --- | --- | --- |")
    print(f"| full train, {NITER} iterations | {train['sgengine']:.2f} s | {train['faiss']:.2f} s | "
          f"{train['sklearn']:.2f} s | {train['sgengine'] / train['faiss']:.2f}x |")
    print(f"| assignment alone | {assign['sgengine']:.3f} s | {assign['faiss']:.3f} s "
          f"(`IndexFlatL2.search`) | - | {assign['sgengine'] / assign['faiss']:.2f}x |")


if __name__ == "__main__":
    main()
