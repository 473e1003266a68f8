"""The TEMI cluster-count bound (C-EDM section 3.3) on 8 separated blobs, six settings (issue 21).

    python benchmarks/bench_temi_bound.py [--n_per 50 100 200] [--dims 16 32] [--epochs 50] [--threads 2]

Each setting: 8 Gaussian blobs of ``n_per`` points in d dimensions, centres N(0, 8^2 I) (every point's
50 cosine nearest neighbours lie in its own blob), ``cluster_count_bound`` with ``TEMIConfig()``,
threshold 0.9, c_start 2, early stopping on. The bound should lie in [8, 16]. Prints one markdown row
a setting: the bound, the C values run (with their C_u, C_dist and epochs), the wall time, and the
host (CPU model, threads, load average: the wall time depends on the machine's load; the process's
CPU time, at 1 thread, is the time on a quiet core).
``pytest benchmarks`` runs a smoke size (2 blobs' worth of clusters, a few epochs).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from benchlib import cpu_model


def blobs(n_per: int, d: int, k: int = 8, sep: float = 8.0, seed: int = 0) -> torch.Tensor:
    """(k n_per, d) points: k centres N(0, sep^2 I), unit-variance Gaussian noise around each."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * sep
    return centres.repeat_interleave(n_per, dim=0) + torch.randn(k * n_per, d, generator=g)




def setting(n_per: int, d: int, epochs: int, k: int = 8) -> dict:
    from sgengine.annotate.temi import cluster_count_bound

    start, cpu = time.perf_counter(), time.process_time()
    bound, rows = cluster_count_bound(blobs(n_per, d, k), epochs=epochs, progress=False, log=lambda _: None)
    return {"n_per": n_per, "d": d, "n": k * n_per, "bound": bound, "rows": rows,
            "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}


def table(results: list[dict], epochs: int) -> str:
    head = (f"{cpu_model()}, {torch.get_num_threads()} torch thread(s), load average "
            f"{os.getloadavg()[0]:.1f} at the end, {time.strftime('%Y-%m-%d')}; TEMIConfig(), {epochs} epochs "
            f"at most a run, threshold 0.9")
    lines = [head, "", "| points a blob | d | N | bound | runs: C (C_u argmax, C_dist, epochs) | wall s | CPU s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        runs = ", ".join(f"{row['C']} ({row['C_u']}, {row['C_dist']:.1f}, {row['epochs']})" for row in r["rows"])
        lines.append(f"| {r['n_per']} | {r['d']} | {r['n']} | {r['bound']} | {runs} | {r['seconds']:.0f} "
                     f"| {r['cpu_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n_per", type=int, nargs="+", default=[50, 100, 200])
    p.add_argument("--dims", type=int, nargs="+", default=[16, 32])
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for n_per in args.n_per:
        for d in args.dims:
            results.append(setting(n_per, d, args.epochs))
            print(table(results[-1:], args.epochs).splitlines()[-1], flush=True)
    print(table(results, args.epochs))
    return 0 if all(8 <= r["bound"] <= 16 for r in results) else 1


def test_temi_bound_smoke():
    """A smoke size: 2 blobs of 20 in d = 8, 5 epochs; the search runs and tabulates."""
    r = setting(20, 8, epochs=5, k=2)
    assert r["bound"] >= 1 and "| 20 | 8 |" in table([r], 5)


if __name__ == "__main__":
    sys.exit(main())
