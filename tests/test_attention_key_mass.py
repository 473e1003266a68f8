"""attention_with_key_mass: SDPA output plus per-key attention mass, both backends.

The truth is an independent float64 computation (einsum + softmax), so the torch backend is
tested too; low-precision Triton results follow the error-budget rule against it.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from sgengine.kernels import attention_key_mass as akm
from sgengine.kernels._budget import max_err, within_budget
from sgengine.kernels.attention_key_mass import (
    _attention_with_key_mass_op, attention_with_key_mass, attention_with_key_mass_ref)

BACKENDS = ("torch", "triton")
# (B, H, Nq, Nk, D): irregular N, batch 1, cross-attention both ways, D not a power of two.
SHAPES = [(1, 2, 217, 217, 64), (2, 3, 100, 37, 32), (1, 1, 45, 130, 128), (2, 2, 70, 70, 40)]


def make_qkv(B, H, Nq, Nk, D, dtype=torch.float32):
    return (torch.randn(B, H, Nq, D).to(dtype), torch.randn(B, H, Nk, D).to(dtype),
            torch.randn(B, H, Nk, D).to(dtype))


def truth(q, k, v, scale=None):
    """float64 out (B, H, Nq, D) and mass (B, Nk), written independently of the reference."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p = torch.einsum("bhid,bhjd->bhij", q, k).mul(scale).softmax(-1)
    return torch.einsum("bhij,bhjd->bhid", p, v), p.sum(2).mean(1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_float64(shape, backend):
    q, k, v = make_qkv(*shape)
    out, mass = attention_with_key_mass(q, k, v, backend=backend)
    out64, mass64 = truth(q, k, v)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert mass.dtype == torch.float32 and mass.shape == (shape[0], shape[3])
    assert max_err(out, out64) <= 1e-5
    assert max_err(mass, mass64) <= 1e-5 * max(1.0, mass64.abs().max().item())


def test_fp32_at_1023_tokens_torch():
    # 1023 is too slow for the interpreter; the Triton path is covered at 217 and below.
    q, k, v = make_qkv(1, 2, 1023, 1023, 64)
    out, mass = attention_with_key_mass(q, k, v, backend="torch")
    out64, mass64 = truth(q, k, v)
    assert max_err(out, out64) <= 1e-5 and max_err(mass, mass64) <= 1e-5


def test_torch_path_runs_query_chunks_and_matches_float64(monkeypatch):
    """Forced into chunks of 7 queries (the last one short): the masses of the chunks add up to the
    whole mass, and the scores of no more than one chunk exist at a time."""
    q, k, v = make_qkv(2, 3, 45, 130, 32)
    monkeypatch.setattr(akm, "CHUNK_BYTES", 3 * 2 * 3 * 130 * 4 * 7)
    seen = []
    real = akm.attention_with_key_mass_ref
    monkeypatch.setattr(akm, "attention_with_key_mass_ref", lambda q, *a: seen.append(q.shape[2]) or real(q, *a))
    out, mass = attention_with_key_mass(q, k, v, backend="torch")
    out64, mass64 = truth(q, k, v)
    assert seen == [7] * 6 + [3]
    assert max_err(out, out64) <= 1e-5 and max_err(mass, mass64) <= 1e-5 * mass64.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_low_precision_within_error_budget(shape, dtype):
    q, k, v = make_qkv(*shape, dtype=dtype)
    out, mass = attention_with_key_mass(q, k, v, backend="triton")
    ref_out, ref_mass = attention_with_key_mass_ref(q, k, v)
    out64, mass64 = truth(q, k, v)  # the truth of the rounded inputs
    assert out.dtype == dtype and mass.dtype == torch.float32
    assert within_budget(out, ref_out, out64, 1e-3)
    assert within_budget(mass, ref_mass, mass64, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_equals_sdpa(backend):
    q, k, v = make_qkv(2, 2, 90, 61, 64)
    out, _ = attention_with_key_mass(q, k, v, scale=0.3, backend=backend)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_key_split_forward_matches_one_pass(dtype):
    # Flash-decoding split: key chunks merged by the combine kernel. Peaky logits (q * 4) put
    # most of a row's mass in one chunk, so the combine's max shift matters.
    from sgengine.kernels._attention_key_mass_triton import launch

    q, k, v = make_qkv(1, 2, 100, 217, 64, dtype)
    q = q * 4
    out64, mass64 = truth(q, k, v)
    ref_out, ref_mass = attention_with_key_mass_ref(q, k, v)
    for k_chunk in (217, 64, 37):  # one pass; 4 chunks; 6 chunks of which the last has 32 keys
        out, mass = launch(q, k, v, 64 ** -0.5, k_chunk=k_chunk)
        assert out.dtype == dtype and torch.isfinite(out).all()
        if dtype == torch.float32:
            assert max_err(out, out64) <= 1e-5 and max_err(mass, mass64) <= 1e-5 * mass64.max().item()
        else:
            assert within_budget(out, ref_out, out64, 1e-3)
            assert within_budget(mass, ref_mass, mass64, 1e-5)


def test_key_chunks_fill_one_wave_and_no_more():
    from sgengine.kernels._attention_key_mass_triton import key_chunk

    # SAG at B=2, H=8, N=256 with 64-row tiles: 64 programs -> 4 chunks of 64 keys (256 programs).
    assert key_chunk(2 * 8 * 4, 256) == 64
    assert key_chunk(2 * 8 * 16, 1024) == 1024  # 256 programs fill a wave already: one pass
    assert key_chunk(5 * 2, 77) == 64  # never more chunks than 64-key blocks
    assert key_chunk(1, 20_000) == 128  # one program: 157 chunks of 128 keys, over one wave


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_self_attention_mass_averages_to_one(backend, dtype):
    q, k, v = make_qkv(3, 4, 150, 150, 32, dtype)
    _, mass = attention_with_key_mass(q * 3, k, v, backend=backend)  # peaky attention
    assert mass.std() > 0.2  # far from uniform: the mean is a real constraint
    # The kernel keeps p in fp32; the reference rounds p to the input dtype before summing.
    tol = 1e-5 if dtype == torch.float32 or backend == "triton" else 1e-2
    torch.testing.assert_close(mass.mean(1), torch.ones(3), rtol=0, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_attention_mass_averages_to_nq_over_nk(backend):
    q, k, v = make_qkv(2, 2, 100, 37, 32)
    _, mass = attention_with_key_mass(q, k, v, backend=backend)
    torch.testing.assert_close(mass.mean(1), torch.full((2,), 100 / 37), rtol=1e-5, atol=0)


def test_strided_inputs_from_token_layout():
    # Models hold (B, N, H, D) and transpose: the kernel takes strides, no copy.
    q = torch.randn(2, 77, 3, 32).transpose(1, 2)
    k, v = (torch.randn(2, 65, 3, 32).transpose(1, 2) for _ in range(2))
    assert not q.is_contiguous()
    out, mass = attention_with_key_mass(q, k, v, backend="triton")
    out64, mass64 = truth(q, k, v)
    assert max_err(out, out64) <= 1e-5 and max_err(mass, mass64) <= 1e-5


def test_auto_backend_on_cpu_is_the_reference():
    q, k, v = make_qkv(1, 2, 40, 40, 32)
    for got, want in zip(attention_with_key_mass(q, k, v), attention_with_key_mass_ref(q, k, v)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("bad, match", [
    (lambda q, k, v: (q[0], k, v), "4-D"),
    (lambda q, k, v: (q, k.half(), v), "one dtype"),
    (lambda q, k, v: (q, k, v[:, :, :5]), "Nk"),
    (lambda q, k, v: (q, k[..., :16], v[..., :16]), "Nk"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), "float16"),
])
def test_clear_errors(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        attention_with_key_mass(*bad(*make_qkv(1, 2, 8, 8, 32)), backend="torch")


def test_unsupported_head_dim_names_the_fix():
    with pytest.raises(ValueError, match="backend='torch'"):
        attention_with_key_mass(*make_qkv(1, 1, 4, 4, 320), backend="triton")


def test_custom_op_traces():
    q, k, v = make_qkv(1, 2, 20, 17, 16)
    torch.library.opcheck(_attention_with_key_mass_op, (q, k, v, 0.25))
    compiled = torch.compile(lambda q, k, v: attention_with_key_mass(q, k, v, backend="triton"),
                             backend="aot_eager", fullgraph=True)
    out, mass = compiled(q, k, v)
    out64, mass64 = truth(q, k, v)
    assert max_err(out, out64) <= 1e-5 and max_err(mass, mass64) <= 1e-5


@settings(max_examples=6, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), Nq=st.integers(1, 80), Nk=st.integers(1, 80),
       D=st.sampled_from([16, 24, 64]), seed=st.integers(0, 2**16))
def test_property_random_shapes(B, H, Nq, Nk, D, seed):
    torch.manual_seed(seed)
    q, k, v = make_qkv(B, H, Nq, Nk, D)
    out, mass = attention_with_key_mass(q, k, v, backend="triton")
    out64, mass64 = truth(q, k, v)
    assert max_err(out, out64) <= 1e-5
    assert max_err(mass, mass64) <= 1e-5 * max(1.0, Nq / Nk)
