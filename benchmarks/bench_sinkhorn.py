"""Sinkhorn-Knopp codes, 3 iterations, eps 0.05: sgengine vs SwAV's PyTorch code.

Run: ``python -m pytest benchmarks/bench_sinkhorn.py --benchmark-only -q``.

Providers: "sgengine" (Triton kernels, ``backend="triton"``), "sgengine-torch" (the log-domain
PyTorch path), "swav" (SwAV's ``distributed_sinkhorn``, one process, eager) and, on a GPU,
"swav-compiled" (the same under ``torch.compile``).

Targets on one H100 for B x K = 512x5000 / 1024x10000 / 4096x10000, float32 scores:
<= 60 us / <= 150 us / <= 0.5 ms (SPEC section 5: SwAV eager 0.23 / 0.72 / 2.54 ms, compiled
0.27 / 0.50 / 1.93 ms). The kernels read the scores 2 * iters + 1 times and write Q once, so the
last target is ~90% of HBM bandwidth in float32 and ~50% in bfloat16.
"""
from __future__ import annotations

import pytest
import torch
import roofline
from benchlib import DEVICE, ON_GPU, check_budget, per_second, record, sizes, timed

from sgengine.kernels.sinkhorn import sinkhorn

EPS, ITERS = 0.05, 3


def swav_sinkhorn(out: torch.Tensor, epsilon: float = EPS, sinkhorn_iterations: int = ITERS):
    """SwAV's ``distributed_sinkhorn`` (main_swav.py) for one process: the baseline."""
    Q = torch.exp(out / epsilon).t()
    B, K = Q.shape[1], Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(sinkhorn_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


_COMPILED = {}


def _provider(name: str):
    if name == "sgengine":
        return lambda s: sinkhorn(s, EPS, ITERS, backend="triton")
    if name == "sgengine-torch":
        return lambda s: sinkhorn(s, EPS, ITERS, backend="torch")
    if name == "swav":
        return swav_sinkhorn
    if "compiled" not in _COMPILED:
        _COMPILED["compiled"] = torch.compile(swav_sinkhorn)
    return _COMPILED["compiled"]


PROVIDERS = ["sgengine", "sgengine-torch", "swav"] + (["swav-compiled"] if ON_GPU else [])
SHAPES = sizes([(512, 5000), (1024, 10000), (4096, 10000)], (16, 100))
DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_sinkhorn(benchmark, provider, shape, dtype):
    B, K = shape
    scores = (torch.rand(B, K, device=DEVICE) * 2 - 1).to(dtype)
    fn = timed(_provider(provider))
    fn(scores)  # warm-up: Triton / inductor compilation stays out of the timing
    if provider == "sgengine":  # SwAV in float64 on the same (rounded) scores is the truth
        check_budget(benchmark, "Q", fn(scores), sinkhorn(scores, EPS, ITERS, backend="torch"),
                     swav_sinkhorn(scores.double()), 1e-6)
    benchmark(fn, scores)
    # Useful traffic of the algorithm, the same for every provider: 2 * iters + 1 reads of the
    # scores (one per column or row pass, plus the pass that writes Q) and one float32 write of Q.
    # roofline_pct is against the compulsory traffic instead (one read, one write: roofline.py).
    nbytes = B * K * (scores.element_size() * (2 * ITERS + 1) + 4)
    record(benchmark, roofline.sinkhorn(B, K, ITERS, scores.element_size()), provider=provider, B=B, K=K,
           dtype=str(dtype), iters=ITERS, gb_per_s=per_second(nbytes, benchmark, 1e9))
