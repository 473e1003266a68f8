"""Softmax attention that also returns the attention mass each key receives.

Self-attention guidance (Hong et al., "Improving Sample Quality of Diffusion Models Using
Self-Attention Guidance") masks the patches that the model's self-attention attends to most:
with A = softmax(Q K^T * scale) of shape (B, H, Nq, Nk), the per-key mass is

    mass[b, j] = (1/H) * sum_h sum_i A[b, h, i, j]        (B, Nk), float32,

whose mean over j is exactly Nq / Nk (1 for self-attention), so ``mass > 1`` reads "this key
gets more than its share". Public implementations materialise A (Nq x Nk per head), which is
why they can only afford the lowest-resolution attention layer. Here:

* ``_attn_fwd_kernel``: a flash-attention forward (online softmax, Dao et al.) that writes the
  output and the per-row log-sum-exp ``lse`` (fp32, (B, H, Nq)).
* ``_key_mass_kernel``: one program per (batch, key block) recomputes p = exp(q k^T * scale - lse)
  for all heads and query blocks and sums over queries in registers. Nothing of size Nq x Nk is
  stored, and no atomics are used, so the mass is deterministic. Extra memory: O(B*H*Nq + B*Nk).

Forward only (guidance runs under ``torch.no_grad``).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._tl import dot_f32, round_cast
from ._backend import check_same_device, interpreter_on, resolve_backend

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): exp2 is the fast hardware path


@triton.jit
def _attn_fwd_kernel(Q, K, V, Out, Lse,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd,
                     svb, svh, svn, svd, sob, soh, som, sod,
                     H, Nq, Nk, D, qk_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr):
    """One program per (query block, batch*head): O = softmax(Q K^T * scale) V, lse per row."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Nq
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    # Online softmax in base 2 (qk_scale already holds log2(e)): running max m_i, running sum l_i.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < Nk
        kT = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        s = dot_f32(q, kT, PRECISION, INTERP_BF16) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + dot_f32(round_cast(p, v.dtype, INTERP_BF16), v, PRECISION, INTERP_BF16)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             round_cast(acc, Out.dtype.element_ty, INTERP_BF16), mask=row_ok[:, None] & d_ok[None, :])
    # lse in natural-log units: m_i and log2(l_i) are base 2.
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(Lse + (b * H + h) * Nq + offs_m, lse, mask=row_ok)


@triton.jit
def _key_mass_kernel(Q, K, Lse, Mass,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd,
                     H, Nq, Nk, D, qk_scale, inv_heads,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr):
    """One program per (key block, batch): mass[b, j] = mean_h sum_i exp(q_i.k_j*scale - lse_i)."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < Nk
    d_ok = offs_d < D
    colsum = tl.zeros([BLOCK_N], tl.float32)
    # Heads and query blocks are looped inside the program (not split over programs) so that the
    # sum has one fixed order: deterministic, and no atomics.
    for h in range(0, H):
        kT = tl.load(K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        for start_m in range(0, Nq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < Nq
            q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            # Padded rows get lse = +inf, hence p = 0; padded columns are never stored.
            lse2 = tl.load(Lse + (b * H + h) * Nq + offs_m, mask=row_ok, other=float("inf"))
            s = dot_f32(q, kT, PRECISION, INTERP_BF16) * qk_scale
            p = tl.exp2(s - lse2[:, None] * 1.4426950408889634)
            colsum += tl.sum(p, 0)
    tl.store(Mass + b * Nk + offs_n, colsum * inv_heads, mask=col_ok)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise a clear error unless q: (B, H, Nq, D), k and v: (B, H, Nk, D) of one float dtype."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, N, D), got shape {tuple(t.shape)}; "
                             "split heads first: x.view(B, N, H, D).transpose(1, 2)")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}: "
                        "cast them")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"expected q (B, H, Nq, D) and k, v (B, H, Nk, D), got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if min(q.shape[2], k.shape[2]) == 0:
        raise ValueError("attention needs at least one query and one key")
    check_same_device(q=q, k=k, v=v)


def _resolve_scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def attention_with_key_mass_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                scale: float | None = None, backend: str = "auto"):
    """Materialised reference: A = softmax(q k^T * scale) in q's dtype; out = A v; mass from A.

    Shapes and dtypes as :func:`attention_with_key_mass`. ``backend`` is accepted for a common
    signature and ignored. Memory O(B * H * Nq * Nk): this is the baseline the kernel replaces.
    """
    _check_inputs(q, k, v)
    attn = torch.softmax((q @ k.transpose(-2, -1)) * _resolve_scale(q, scale), dim=-1)
    return attn @ v, attn.float().sum(dim=2).mean(dim=1)


def _configs(rows):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
            for m, n, w, st in rows]


# GPU candidates after the Triton fused-attention tutorial (Hopper/Ampere); tuned once per shape.
_attn_fwd_tuned = triton.autotune(
    _configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3),
              (128, 32, 4, 4), (64, 32, 4, 2)]),
    key=["Nq", "Nk", "BLOCK_D", "PRECISION"])(_attn_fwd_kernel)
_key_mass_tuned = triton.autotune(
    _configs([(64, 128, 8, 3), (64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3),
              (32, 64, 4, 2)]),
    key=["H", "Nq", "Nk", "BLOCK_D", "PRECISION"])(_key_mass_kernel)
# Under the interpreter: small blocks so that small test shapes still loop over several blocks.
_INTERPRETED = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Run the two Triton kernels; returns (out (B, H, Nq, D) in q.dtype, mass (B, Nk) fp32)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    out = torch.empty((B, H, Nq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    mass = torch.empty((B, Nk), device=q.device, dtype=torch.float32)
    # fp32 inputs: exact fp32 products (TF32 would cost ~1e-3 relative error); 16-bit inputs are
    # exact in the tensor-core path already.
    opts = dict(BLOCK_D=max(16, triton.next_power_of_2(D)),  # tl.dot needs inner dims >= 16
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                INTERP_BF16=interpreter_on() and q.dtype == torch.bfloat16)
    fwd, key_mass = _attn_fwd_tuned, _key_mass_tuned
    if interpreter_on():
        fwd, key_mass = _attn_fwd_kernel, _key_mass_kernel
        opts.update(_INTERPRETED)
    qk_scale = scale * _LOG2E  # base-2 exponentials inside the kernels
    fwd[lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)](
        q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, Nq, Nk, D, qk_scale, **opts)
    key_mass[lambda meta: (triton.cdiv(Nk, meta["BLOCK_N"]), B)](
        q, k, lse, mass, *q.stride(), *k.stride(), H, Nq, Nk, D, qk_scale, 1.0 / H, **opts)
    return out, mass


@torch.library.custom_op("sgengine::attention_with_key_mass", mutates_args=())
def _attention_with_key_mass_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(q, k, v, scale)


@_attention_with_key_mass_op.register_fake
def _(q, k, v, scale):
    B, H, Nq, D = q.shape
    return q.new_empty((B, H, Nq, D)), q.new_empty((B, k.shape[2]), dtype=torch.float32)


def attention_with_key_mass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            scale: float | None = None, backend: str = "auto"):
    """Attention output and per-key attention mass, without materialising the attention map.

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D); one dtype of float16, bfloat16, float32;
            D <= 256 (any D, padded to a power of two >= 16 inside the kernel); any strides.
        scale: softmax scale, default 1/sqrt(D) (as ``F.scaled_dot_product_attention``).
        backend: "auto" (Triton on CUDA, PyTorch on CPU), "triton" or "torch".

    Returns:
        out: (B, H, Nq, D) in q's dtype, equal to ``F.scaled_dot_product_attention(q, k, v)``.
        mass: (B, Nk) float32, mass[b, j] = mean over heads of sum over queries of
            softmax(q k^T * scale)[b, h, i, j]; its mean over j is Nq / Nk.
    """
    _check_inputs(q, k, v)
    scale = _resolve_scale(q, scale)
    if resolve_backend(backend, q, k, v) == "torch":
        return attention_with_key_mass_ref(q, k, v, scale)
    if q.shape[-1] > _MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[-1]} > {_MAX_HEAD_DIM} is not supported by the Triton "
                         "kernel: use backend='torch'")
    return _attention_with_key_mass_op(q, k, v, scale)
