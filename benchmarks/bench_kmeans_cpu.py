"""CPU k-means on 2 threads: sgengine vs faiss (and scikit-learn for the full train), side by side.

    python -m pytest benchmarks/bench_kmeans_cpu.py --benchmark-only -q     # smoke size (CI)
    SGENGINE_BENCH_FULL=1 python -m pytest benchmarks/bench_kmeans_cpu.py --benchmark-only
    python benchmarks/bench_kmeans_cpu.py --full --repeats 5 --seeds 0 1    # interleaved tables

Sizes: N=100k, d=128, K=1000 (issue #14) and N=200k, d=64, K=500 behind ``SGENGINE_BENCH_FULL=1``
/ ``--full``; otherwise N=3000, d=16, K=30. Providers:

* ``sgengine``: ``KMeans`` with backend "auto": on the CPU its assignment is faiss's
  ``IndexFlatL2.search`` where faiss is installed (issue 21), else the torch path;
* ``sgengine-torch``: backend "torch", the blocked ``addmm`` + ``min`` (no N x K matrix) on
  torch's BLAS, whose speed depends on the host (MKL on AMD: issue 21);
* ``faiss``: ``IndexFlatL2.search(x, 1)`` on the same centroids; ``faiss.Kmeans`` (random init,
  every row: max_points_per_centroid large enough) for the 20-iteration train;
* ``sklearn``: ``KMeans(max_iter=20, n_init=1, tol=0)`` (greedy k-means++ on all rows), train only.

Targets (issues #14, #21): assignment and train within 1.5x of faiss on every host. Every table
starts with the host (CPU model, torch's BLAS, faiss's BLAS): a CPU ratio means nothing without
it. The script mode runs the providers round-robin and keeps each one's fastest repeat, so that
a shared, busy machine hurts all alike.
"""
from __future__ import annotations

import argparse
import os
import time

import pytest
import torch
from benchlib import best_seconds, cpu_model, torch_blas

from sgengine.annotate.kmeans import KMeans

FULL = (100_000, 128, 1000)
SECOND = (200_000, 64, 500)
SMOKE = (3000, 16, 30)
NITER = 20
THREADS = 2
SHAPE = FULL if os.environ.get("SGENGINE_BENCH_FULL", "0") not in ("", "0") else SMOKE


def make_data(n: int, d: int, k: int, seed: int = 0):
    """x (n, d) float32 around k hidden centres (noise larger than their spread), k rows as centroids."""
    g = torch.Generator().manual_seed(seed)
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


def host() -> str:
    """CPU model, torch's BLAS and faiss's BLAS (via threadpoolctl where installed)."""
    return f"{cpu_model()}; torch {torch.__version__}: {torch_blas()}; faiss: {faiss_blas()}"




def faiss_blas() -> str:
    try:
        import faiss
        from threadpoolctl import threadpool_info
    except ImportError as err:
        return f"unknown ({err.name} not installed)"
    libs = [i for i in threadpool_info() if i["user_api"] == "blas" and "faiss" in i["filepath"]]
    return ", ".join(f"{i['internal_api']} {i['version']} ({i.get('architecture')})" for i in libs) or \
        f"{faiss.__version__}, BLAS not found by threadpoolctl"


def sgengine_km(provider: str, d: int, k: int, **kw) -> KMeans:
    return KMeans(d, k, backend="torch" if provider == "sgengine-torch" else "auto", **kw)


def assigner(provider: str, x: torch.Tensor, c: torch.Tensor):
    """A 0-argument function assigning every row of x to c."""
    if provider.startswith("sgengine"):
        km = sgengine_km(provider, x.shape[1], c.shape[0])
        km.centroids = c
        return lambda: km.assign(x)
    faiss = pytest.importorskip("faiss")
    index, xn = faiss.IndexFlatL2(x.shape[1]), x.numpy()
    index.add(c.numpy())
    return lambda: index.search(xn, 1)


def trainer(provider: str, x: torch.Tensor, k: int):
    """A 0-argument function training k-means (NITER iterations) on x from scratch."""
    if provider.startswith("sgengine"):
        return lambda: sgengine_km(provider, x.shape[1], k, niter=NITER, seed=0).train(x)
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
@pytest.mark.parametrize("provider", ["sgengine", "sgengine-torch", "faiss"])
def test_cpu_assignment(benchmark, provider):
    n, d, k = SHAPE
    x, c = make_data(n, d, k)
    fn = assigner(provider, x, c)
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    best = best_seconds(benchmark)
    benchmark.extra_info.update(device=f"cpu, {THREADS} threads", host=host(), provider=provider, N=n, d=d, K=k,
                                best_s=best, tflop_per_s=2 * n * k * d / best / 1e12 if best else None)


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("provider", ["sgengine", "sgengine-torch", "faiss", "sklearn"])
def test_cpu_train(benchmark, provider):
    n, d, k = SHAPE
    if provider == "sklearn" and SHAPE == FULL and os.environ.get("SGENGINE_BENCH_SKLEARN", "1") == "0":
        pytest.skip("SGENGINE_BENCH_SKLEARN=0: sklearn's full-size train (~40 s) skipped")
    x, _ = make_data(n, d, k)
    fn = trainer(provider, x, k)
    benchmark.pedantic(fn, rounds=2 if SHAPE == FULL else 3, warmup_rounds=0)
    benchmark.extra_info.update(device=f"cpu, {THREADS} threads", host=host(), provider=provider, N=n, d=d,
                                K=k, best_s=best_seconds(benchmark), niter=NITER)


def interleaved(fns: dict, repeats: int) -> dict:
    """Fastest of ``repeats`` runs per provider, the providers taking turns each round."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def table(n: int, d: int, k: int, seed: int, args) -> None:
    """One markdown table: 20-iteration train (and the init alone), assignment alone; ratios to faiss."""
    x, c = make_data(n, d, k, seed)
    names = ("sgengine", "sgengine-torch", "faiss")
    rows = [("assignment alone", interleaved({q: assigner(q, x, c) for q in names}, args.repeats), ".4f")]
    if args.train_repeats:
        train = interleaved({q: trainer(q, x, k) for q in names}, args.train_repeats)
        if args.sklearn_repeats:
            train.update(interleaved({"sklearn": trainer("sklearn", x, k)}, args.sklearn_repeats))
        init = interleaved({"sgengine": lambda: KMeans(d, k, niter=0, seed=0).train(x)}, args.train_repeats)
        rows = [(f"full train, {NITER} iterations", train, ".2f"),
                ("of which greedy k-means++ init", {**init, "faiss": train["faiss"]}, ".2f")] + rows
    print(f"\nN={n}, d={d}, K={k}, data seed {seed}, {THREADS} threads, fastest of {args.repeats} "
          f"(train: {args.train_repeats}) interleaved runs, load average {os.getloadavg()[0]:.1f}\n")
    print("| what | sgengine (auto) | sgengine (torch) | faiss | sklearn | auto / faiss | torch / faiss |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for what, t, unit in rows:
        cells = " | ".join(f"{t[q]:{unit}} s" if q in t else "-" for q in (*names, "sklearn"))
        torch_ratio = f"{t['sgengine-torch'] / t['faiss']:.2f}x" if "sgengine-torch" in t else "-"
        print(f"| {what} | {cells} | {t['sgengine'] / t['faiss']:.2f}x | {torch_ratio} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="N=100k, d=128, K=1000 and N=200k, d=64, K=500")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shape", type=int, nargs=3, metavar=("N", "d", "K"), help="one size instead")
    p.add_argument("--train_repeats", type=int, default=3, help="0: assignment only")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="data seeds, one table each")
    p.add_argument("--sklearn_repeats", type=int, default=1, help="sklearn's train is slow: fewer repeats")
    args = p.parse_args()
    set_threads(THREADS)
    print(f"host: {host()}")
    shapes = [tuple(args.shape)] if args.shape else [FULL, SECOND] if args.full else [SMOKE]
    for n, d, k in shapes:
        for seed in args.seeds:
            table(n, d, k, seed, args)


if __name__ == "__main__":
    main()
