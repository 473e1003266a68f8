"""Triton path of :func:`sgengine.kernels.attention_key_mass.attention_with_key_mass` (imported
only when it runs).

* ``_attn_fwd_kernel``: a flash-attention forward (online softmax, Dao et al.) that writes the
  output and the per-row log-sum-exp ``lse`` (fp32, (B, H, Nq)). When (query blocks) x B x H
  cannot fill the GPU (SAG at B=2, N=256: 64 programs, half an H100 wave), the keys are split
  too, as in flash-decoding: each program covers one key chunk and writes its normalised fp32
  output and chunk lse, and ``_attn_combine_kernel`` merges the chunks in a fixed order
  (deterministic, no atomics): lse = log sum_s exp(lse_s), O = sum_s exp(lse_s - lse) O_s.
* ``_key_mass_kernel``: one program per (key block, batch, head x query chunk) recomputes
  p = exp(q k^T * scale - lse) over its chunk of queries and sums it over them in registers; it
  writes that partial column sum to a (splits, B, Nk) fp32 buffer, which one fixed-order sum over
  the splits reduces to the mass. Splitting over heads and query chunks fills the GPU at small
  batches (B=2, N=1024, 8 heads: 512 programs, was 16 with one program per (key block, batch)
  looping over every head); no atomics, so the mass stays deterministic.

Configs are per head dim (BLOCK_D) and per precision: each list holds only tiles that compile
without spills on sm_80/86/89/90 (``python -m sgengine.kernels.audit``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common.gpus import ONE_WAVE
from ._backend import interpreter_on
from ._tl import dot_f32, round_cast

_LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): exp2 is the fast hardware path
# Programs a pass aims for: two waves of an H100's 132 SMs (A100 108, A5000 64). A forward grid
# under one wave splits its keys.
_MIN_PROGRAMS = 2 * ONE_WAVE
_CHUNK = 64  # query chunks of the key-mass pass are multiples of this (every BLOCK_M divides it)
_MASS_BLOCK_N = 64  # the largest BLOCK_N of the key-mass configs
_COMBINE_ROWS = 16  # rows a combine program merges: 256 programs at B=2 H=8 N=256


@triton.jit
def _attn_fwd_kernel(Q, K, V, Out, Lse,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd,
                     svb, svh, svn, svd, sob, soh, som, sod,
                     H, Nq, Nk, D, qk_scale, k_chunk,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr):
    """One program per (query block, batch*head, key chunk): O = softmax(Q K^T * scale) V over
    keys [split * k_chunk, (split + 1) * k_chunk), lse per row. Out is (splits, B, H, Nq, D) and
    Lse (splits, B, H, Nq), each chunk's own results (with one chunk, the final ones)."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    split = tl.program_id(2)
    n_lo = split * k_chunk
    n_keys = tl.minimum(k_chunk, Nk - n_lo)
    Out += split * (tl.num_programs(1) * Nq * D)  # chunk outputs are contiguous (B, H, Nq, D)
    Lse += split * (tl.num_programs(1) * Nq)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Nq
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * skb + h * skh + n_lo * skn  # this program's key chunk starts at n_lo
    v_base = V + b * svb + h * svh + n_lo * svn
    # Online softmax in base 2 (qk_scale already holds log2(e)): running max m_i, running sum l_i.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, n_keys, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < n_keys
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
def _attn_combine_kernel(Part, PartLse, Out, Lse, splits, rows, D,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, INTERP_BF16: tl.constexpr):
    """One program per BLOCK_R rows of (B*H*Nq): merge the key chunks' results, chunk by chunk in
    order. Part (splits, rows, D) fp32, PartLse (splits, rows) -> Out (rows, D), Lse (rows,)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = offs_r < rows
    mask = r_ok[:, None] & (offs_d < D)[None, :]
    # Online over the chunks, in order (as the forward's online softmax): running max m.
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s in range(0, splits):
        lse_s = tl.load(PartLse + s * rows + offs_r, mask=r_ok, other=0.0)
        o = tl.load(Part + (s * rows + offs_r[:, None]) * D + offs_d[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m, lse_s)
        alpha = tl.exp(m - m_new)
        w = tl.exp(lse_s - m_new)
        total = total * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o
        m = m_new
    tl.store(Out + offs_r[:, None] * D + offs_d[None, :],
             round_cast(acc / total[:, None], Out.dtype.element_ty, INTERP_BF16), mask=mask)
    tl.store(Lse + offs_r, m + tl.log(total), mask=r_ok)


@triton.jit
def _key_mass_kernel(Q, K, Lse, Partial,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd,
                     H, Nq, Nk, D, qk_scale, q_chunk,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr):
    """One program per (key block, batch, split = head x query chunk):
    partial[split, b, j] = sum over the chunk's queries i of exp(q_i.k_j * scale - lse_i)."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    chunks = tl.cdiv(Nq, q_chunk)
    h = split // chunks
    m0 = (split % chunks) * q_chunk
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < Nk
    d_ok = offs_d < D
    kT = tl.load(K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                 mask=col_ok[None, :] & d_ok[:, None], other=0.0)
    colsum = tl.zeros([BLOCK_N], tl.float32)
    # Query blocks in order inside the program: one fixed summation order, no atomics.
    for start_m in range(m0, tl.minimum(m0 + q_chunk, Nq), BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Nq
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        # Padded rows get lse = +inf, hence p = 0; padded columns are never stored.
        lse2 = tl.load(Lse + (b * H + h) * Nq + offs_m, mask=row_ok, other=float("inf"))
        s = dot_f32(q, kT, PRECISION, INTERP_BF16) * qk_scale
        p = tl.exp2(s - lse2[:, None] * 1.4426950408889634)
        colsum += tl.sum(p, 0)
    tl.store(Partial + (split * tl.num_programs(1) + b) * Nk + offs_n, colsum, mask=col_ok)


def _configs(rows):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
            for m, n, w, st in rows]


# (BLOCK_M, BLOCK_N, warps, stages) per (16-bit?, BLOCK_D), after the Triton fused-attention
# tutorial, pruned to the tiles that compile without spills on every target.
_FWD = {
    (True, 64): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
    (True, 128): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
    (True, 256): [(64, 32, 8, 2)],  # 64 rows: the least a warpgroup's wgmma takes on sm_90
    # Exact fp32 runs on the CUDA cores, whose dot operands sit whole in registers: 16 rows.
    (False, 64): [(16, 32, 4, 1)],
    (False, 128): [(16, 32, 8, 1)],
    (False, 256): [(16, 32, 8, 1)],
}
# Key mass: BLOCK_M <= _CHUNK (query chunks are multiples of it) and BLOCK_N <= _MASS_BLOCK_N
# (the launcher sizes the splits for that many keys a program).
_MASS = {
    (True, 64): [(64, 64, 4, 3)],
    (True, 128): [(64, 64, 4, 3)],
    (True, 256): [(64, 64, 8, 2)],
    (False, 64): [(16, 32, 4, 1)],  # 32 x 32 spilled 556 B at D=128 on sm_86/89
    (False, 128): [(16, 32, 4, 1)],
    (False, 256): [(16, 32, 4, 1)],
}
_FWD_KEY = ["Nq", "Nk", "k_chunk", "BLOCK_D", "PRECISION"]
_MASS_KEY = ["H", "Nq", "Nk", "BLOCK_D", "PRECISION"]
# Forward autotuners per (table, small grid?): on a small grid only tiles of <= 64 query rows,
# so that B * H * cdiv(Nq, BLOCK_M) is as large as the forward's decomposition allows.
_FWD_TUNED = {(k, small): triton.autotune(_configs([c for c in v if not small or c[0] <= 64]),
                                          key=_FWD_KEY)(_attn_fwd_kernel)
              for k, v in _FWD.items() for small in (False, True)}
_MASS_TUNED = {k: triton.autotune(_configs(v), key=_MASS_KEY)(_key_mass_kernel)
               for k, v in _MASS.items()}
# Under the interpreter: small blocks so that small test shapes still loop over several blocks.
_INTERPRETED = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}


def key_chunk(programs: int, Nk: int) -> int:
    """Keys per chunk of the forward (a multiple of _CHUNK, so every BLOCK_N divides it). Nk (one
    chunk, no combine pass) when the ``programs`` of the query blocks fill one wave; else enough
    chunks that programs x chunks reaches _MIN_PROGRAMS, at most one per _CHUNK keys."""
    chunks = 1 if programs >= ONE_WAVE else triton.cdiv(_MIN_PROGRAMS, programs)
    chunks = max(1, min(triton.cdiv(Nk, _CHUNK), chunks))
    return Nk if chunks == 1 else _chunk_size(Nk, chunks)


def _query_chunk(B: int, H: int, Nq: int, Nk: int) -> int:
    """Queries per split of the key-mass pass (a multiple of _CHUNK): enough splits that
    (key blocks) x B x (splits) reaches _MIN_PROGRAMS, or one chunk per _CHUNK queries."""
    want = triton.cdiv(_MIN_PROGRAMS, B * H * triton.cdiv(Nk, _MASS_BLOCK_N))
    chunks = max(1, min(triton.cdiv(Nq, _CHUNK), want))
    return _chunk_size(Nq, chunks)


def _chunk_size(n: int, chunks: int) -> int:
    """The size of ``chunks`` (or fewer) equal chunks of n, rounded up to a multiple of _CHUNK."""
    return triton.cdiv(triton.cdiv(n, chunks), _CHUNK) * _CHUNK


def _forward(fwd, q, k, v, qk_scale, k_chunk, opts):
    """Flash forward, split over key chunks when that fills the GPU; (out, lse)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    splits = triton.cdiv(Nk, k_chunk)
    out = torch.empty((B, H, Nq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    part, part_lse = out, lse
    if splits > 1:  # chunk results in fp32, merged below
        part = torch.empty((splits, B, H, Nq, D), device=q.device, dtype=torch.float32)
        part_lse = torch.empty((splits, B, H, Nq), device=q.device, dtype=torch.float32)
    fwd[lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * H, splits)](
        q, k, v, part, part_lse, *q.stride(), *k.stride(), *v.stride(), *part.stride()[-4:],
        H, Nq, Nk, D, qk_scale, k_chunk, **opts)
    if splits > 1:
        rows = B * H * Nq
        _attn_combine_kernel[(triton.cdiv(rows, _COMBINE_ROWS),)](
            part, part_lse, out, lse, splits, rows, D, BLOCK_R=_COMBINE_ROWS,
            BLOCK_D=opts["BLOCK_D"], INTERP_BF16=opts["INTERP_BF16"], num_warps=4)
    return out, lse


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           k_chunk: int | None = None):
    """Run the Triton kernels; returns (out (B, H, Nq, D) in q.dtype, mass (B, Nk) fp32).
    ``k_chunk``: keys per chunk of the forward (default: :func:`key_chunk`; tests set it)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    q_chunk = _query_chunk(B, H, Nq, Nk)
    splits = H * triton.cdiv(Nq, q_chunk)
    partial = torch.empty((splits, B, Nk), device=q.device, dtype=torch.float32)
    low = q.dtype != torch.float32
    block_d = max(16, triton.next_power_of_2(D))  # tl.dot needs inner dims >= 16
    # fp32 inputs: exact fp32 products (TF32 would cost ~1e-3 relative error); 16-bit inputs are
    # exact in the tensor-core path already.
    opts = dict(BLOCK_D=block_d, PRECISION="tf32" if low else "ieee",
                INTERP_BF16=interpreter_on() and q.dtype == torch.bfloat16)
    table = (low, max(64, block_d))
    small = B * H * triton.cdiv(Nq, 128) < _MIN_PROGRAMS
    fwd, key_mass = _FWD_TUNED[table, small], _MASS_TUNED[table]
    block_m = max(c.kwargs["BLOCK_M"] for c in fwd.configs)  # the fewest programs it may launch
    if interpreter_on():
        fwd, key_mass = _attn_fwd_kernel, _key_mass_kernel
        opts.update(_INTERPRETED)
        block_m = _INTERPRETED["BLOCK_M"]
    k_chunk = k_chunk or key_chunk(B * H * triton.cdiv(Nq, block_m), Nk)
    qk_scale = scale * _LOG2E  # base-2 exponentials inside the kernels
    out, lse = _forward(fwd, q, k, v, qk_scale, k_chunk, opts)
    key_mass[lambda meta: (triton.cdiv(Nk, meta["BLOCK_N"]), B, splits)](
        q, k, lse, partial, *q.stride(), *k.stride(), H, Nq, Nk, D, qk_scale, q_chunk, **opts)
    # The fixed-order second reduction: deterministic (no atomics), then the mean over heads.
    return out, partial.sum(dim=0).mul_(1.0 / H)
