"""Softmax attention that also returns the attention mass each key receives.

Self-attention guidance (Hong et al., "Improving Sample Quality of Diffusion Models Using
Self-Attention Guidance") masks the patches that the model's self-attention attends to most:
with A = softmax(Q K^T * scale) of shape (B, H, Nq, Nk), the per-key mass is

    mass[b, j] = (1/H) * sum_h sum_i A[b, h, i, j]        (B, Nk), float32,

whose mean over j is exactly Nq / Nk (1 for self-attention), so ``mass > 1`` reads "this key
gets more than its share". Public implementations materialise A (Nq x Nk per head), which is
why they can only afford the lowest-resolution attention layer. Here (``_attention_key_mass_triton``,
imported only when the Triton path runs), a flash-attention forward writes the output and the
per-row log-sum-exp, and a second pass recomputes p = exp(q k^T * scale - lse) by key block and
sums it over queries in registers, split over heads and query chunks with a fixed-order final
sum. When the query blocks alone cannot fill the GPU (SAG while sampling: B=2, N=256), the
forward splits the keys into chunks too and merges the chunks' outputs by their log-sum-exps,
again in a fixed order. Nothing of size Nq x Nk is stored, and no atomics are used, so output
and mass are deterministic. Extra memory: O(B*H*Nq + splits*B*Nk), plus chunks*B*H*Nq*D fp32
on a key-split forward (small grids only).

The PyTorch path (``backend="torch"``, the CPU default) runs the reference on chunks of queries
(``attention_key_mass_chunked``): each chunk's scores, softmax and output live only while that
chunk runs, within ``CHUNK_BYTES`` of temporaries, and the mass is summed chunk by chunk. At
SD3-medium's attention (B=2, 24 heads, 4096 image + 333 text tokens) that is 64 MiB against the
7 GB the materialised map takes (benchmarks/bench_dit.py measures both).

Forward only (guidance runs under ``torch.no_grad``).
"""
from __future__ import annotations

import math

import torch

from ._backend import check_same_device, resolve_backend

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


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


CHUNK_BYTES = 64 * 2**20  # temporaries of one query chunk on the PyTorch path


def attention_key_mass_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference on query chunks: same out and mass, O(chunk * Nk) memory instead of Nq * Nk.

    A chunk holds the scores, their scaled copy and the softmax (3 maps of rows x Nk per batch and
    head), sized to ``CHUNK_BYTES``; the mass is linear in the queries, so the chunks' masses add
    up. A problem that fits one chunk runs the reference itself (bit-identical)."""
    B, H, Nq, _ = q.shape
    scale = _resolve_scale(q, scale)
    rows = max(1, CHUNK_BYTES // (3 * B * H * k.shape[2] * max(q.element_size(), 4)))
    if rows >= Nq:
        return attention_with_key_mass_ref(q, k, v, scale)
    out, mass = q.new_empty(q.shape), q.new_zeros((B, k.shape[2]), dtype=torch.float32)
    for i in range(0, Nq, rows):
        out[:, :, i:i + rows], part = attention_with_key_mass_ref(q[:, :, i:i + rows], k, v, scale)
        mass += part
    return out, mass


@torch.library.custom_op("sgengine::attention_with_key_mass", mutates_args=())
def _attention_with_key_mass_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from ._attention_key_mass_triton import launch  # triton is imported by the Triton path only

    return launch(q, k, v, scale)


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
        backend: "auto" (Triton on CUDA, PyTorch on CPU), "triton" or "torch" (query chunks of
            ``CHUNK_BYTES``, never the whole map).

    Returns:
        out: (B, H, Nq, D) in q's dtype, equal to ``F.scaled_dot_product_attention(q, k, v)``.
        mass: (B, Nk) float32, mass[b, j] = mean over heads of sum over queries of
            softmax(q k^T * scale)[b, h, i, j]; its mean over j is Nq / Nk.
    """
    _check_inputs(q, k, v)
    scale = _resolve_scale(q, scale)
    if resolve_backend(backend, q, k, v) == "torch":
        return attention_key_mass_chunked(q, k, v, scale)
    if q.shape[-1] > _MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[-1]} > {_MAX_HEAD_DIM} is not supported by the Triton "
                         "kernel: use backend='torch'")
    return _attention_with_key_mass_op(q, k, v, scale)
