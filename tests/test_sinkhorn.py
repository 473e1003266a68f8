"""Sinkhorn-Knopp codes (kernels/sinkhorn.py) against a literal transcription of SwAV's code."""
from __future__ import annotations

import importlib

import pytest
import torch
from sgtest import torchrun
from hypothesis import given, settings
from hypothesis import strategies as st

sk = importlib.import_module("sgengine.kernels.sinkhorn")  # the module: the package exports a function of that name
from sgengine.kernels.sinkhorn import sinkhorn, sinkhorn_ref


def swav_sinkhorn(out: torch.Tensor, epsilon: float = 0.05, sinkhorn_iterations: int = 3) -> torch.Tensor:
    """The spec: SwAV's ``distributed_sinkhorn`` (main_swav.py), one process, verbatim otherwise."""
    Q = torch.exp(out / epsilon).t()  # Q is K-by-B for consistency with notations from our paper
    B = Q.shape[1]  # number of samples to assign
    K = Q.shape[0]  # how many prototypes
    # make the matrix sums to 1
    sum_Q = torch.sum(Q)
    Q /= sum_Q
    for it in range(sinkhorn_iterations):
        # normalize each row: total weight per prototype must be 1/K
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        Q /= sum_of_rows
        Q /= K
        # normalize each column: total weight per sample must be 1/B
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B  # the colomns must sum to 1 so that Q is an assignment
    return Q.t()


def spec(scores: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """SwAV's code in float64 on exactly the values the kernel reads."""
    return swav_sinkhorn(scores.double(), eps, iters)


def max_rel_err(q: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest elementwise relative error; entries below 1e-36 (where fp32 turns subnormal and
    underflows, while the fp64 spec does not) count by their absolute error scaled to 1e-36."""
    return ((q.double() - ref).abs() / ref.clamp(min=1e-36)).max().item()


def rtol_for(eps: float) -> float:
    """1e-5 at SwAV's eps=0.05. Q = exp(s / eps) turns the 2^-24 rounding of fp32 values into
    |s| / eps * 2^-24 relative error, so the tolerance grows as 1/eps below 0.05."""
    return 1e-5 * max(1.0, 0.05 / eps)


def scores_in_unit_range(b: int, k: int, dtype=torch.float32) -> torch.Tensor:
    """Cosine-similarity-like scores in [-1, 1], as SwAV's normalised features and prototypes give."""
    return (torch.rand(b, k) * 2 - 1).to(dtype)


@pytest.fixture(params=["fused", "passes"])
def triton_path(request, monkeypatch):
    """Run the Triton backend through the one-program kernel or the alternating-pass kernels."""
    monkeypatch.setattr(sk, "_FUSED_MAX_NUMEL", 1 << 30 if request.param == "fused" else 0)
    return request.param


@pytest.mark.parametrize("B", [1, 7, 217, 1023])
def test_torch_matches_swav_at_3000_prototypes(B):
    s = scores_in_unit_range(B, 3000)
    q = sinkhorn(s, backend="torch")
    assert q.dtype == torch.float32 and q.shape == (B, 3000)
    assert max_rel_err(q, spec(s)) <= 1e-5


@pytest.mark.parametrize("B,K", [(1, 7), (1, 3000), (5, 217), (64, 1023), (33, 130)])
def test_triton_matches_swav(B, K, triton_path):
    s = scores_in_unit_range(B, K)
    q = sinkhorn(s, backend="triton")
    assert q.dtype == torch.float32 and q.shape == (B, K)
    assert max_rel_err(q, spec(s)) <= 1e-5


@pytest.mark.parametrize("iters,eps", [(1, 0.05), (5, 0.1)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_other_iterations_and_temperatures(iters, eps, backend):
    s = scores_in_unit_range(19, 300)
    assert max_rel_err(sinkhorn(s, eps, iters, backend=backend), spec(s, eps, iters)) <= rtol_for(eps)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rows_sum_to_one(backend):
    q = sinkhorn(scores_in_unit_range(50, 333), backend=backend)
    torch.testing.assert_close(q.sum(1), torch.ones(50), rtol=0, atol=1e-5)
    assert (q >= 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_eps_001_is_finite_where_swav_fp32_overflows(backend, triton_path):
    s = scores_in_unit_range(40, 217)
    s[3] = -1.0  # one sample scored far below every other sample on every prototype
    s[5, 10] = 1.0
    assert not torch.isfinite(swav_sinkhorn(s.clone(), 0.01)).all()  # exp(100) overflows fp32
    q = sinkhorn(s, eps=0.01, backend=backend)
    assert torch.isfinite(q).all()
    assert max_rel_err(q, spec(s, 0.01)) <= rtol_for(0.01)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype, triton_path):
    s32 = scores_in_unit_range(37, 500)
    s = s32.to(dtype)
    truth = sinkhorn_ref(s32)
    err_ref = (sinkhorn_ref(s) - truth).abs().max().item()
    q = sinkhorn(s, backend="triton")
    assert q.dtype == torch.float32 and torch.isfinite(q).all()
    assert (q - truth).abs().max().item() <= 2 * err_ref + 1e-6
    # The kernel reads the 16-bit values exactly: it must match SwAV on those very values.
    assert max_rel_err(q, spec(s)) <= 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_eps_001_bf16_is_finite(backend):
    s = scores_in_unit_range(64, 300, torch.bfloat16)
    q = sinkhorn(s, eps=0.01, backend=backend)
    assert torch.isfinite(q).all()
    assert max_rel_err(q, spec(s, 0.01)) <= rtol_for(0.01)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_input(backend, triton_path):
    s = scores_in_unit_range(300, 21).t()  # (21, 300) with strides (1, 21)
    assert not s.is_contiguous()
    assert max_rel_err(sinkhorn(s, backend=backend), spec(s)) <= 1e-5


def test_auto_backend_on_cpu_is_torch():
    s = scores_in_unit_range(9, 70)
    assert torch.equal(sinkhorn(s), sinkhorn_ref(s))


def test_no_gradient_flows():
    s = scores_in_unit_range(4, 10).requires_grad_()
    assert not sinkhorn(s, backend="torch").requires_grad
    assert not sinkhorn(s, backend="triton").requires_grad


def test_custom_op_registration():
    s = scores_in_unit_range(6, 50)
    torch.library.opcheck(torch.ops.sgengine.sinkhorn.default, (s, 0.05, 3),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("bad,err", [
    (dict(scores=torch.rand(2, 3, 4)), ValueError),
    (dict(scores=torch.rand(0, 3)), ValueError),
    (dict(scores=torch.rand(2, 3).double()), TypeError),
    (dict(eps=0.0), ValueError),
    (dict(iters=0), ValueError),
    (dict(backend="cuda"), ValueError),
])
def test_clear_errors(bad, err):
    args = dict(scores=torch.rand(2, 3), eps=0.05, iters=3, backend="torch") | bad
    with pytest.raises(err):
        sinkhorn(**args)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 40), K=st.integers(1, 90), eps=st.sampled_from([0.03, 0.05, 0.5]),
       iters=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_property_matches_swav(B, K, eps, iters, seed):
    s = torch.rand(B, K, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    assert max_rel_err(sinkhorn(s, eps, iters, backend="torch"), spec(s, eps, iters)) <= rtol_for(eps)


@pytest.mark.distributed
def test_distributed_equals_single_process_on_concatenated_batch():
    proc = torchrun("dist_sinkhorn.py", timeout=120)
    assert "dist_sinkhorn OK" in proc.stdout
