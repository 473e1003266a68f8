"""The one attention function every sgengine model calls.

``attention(q, k, v)`` runs ``torch.nn.functional.scaled_dot_product_attention``
(flash / cuDNN / memory-efficient kernels on CUDA) by default, or xformers'
memory-efficient attention when installed and asked for. Attention modules
keep a per-instance ``attend`` hook so that guidance (SAG) can swap in the
kernel that also returns the per-key attention mass, without touching models.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_DEFAULT = {"impl": "sdpa"}


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        return False
    return True


def set_attention_impl(impl: str) -> None:
    """Choose the process-wide implementation: ``"sdpa"`` (default) or ``"xformers"``."""
    if impl not in ("sdpa", "xformers"):
        raise ValueError(f"attention impl must be 'sdpa' or 'xformers', got {impl!r}")
    if impl == "xformers" and not xformers_available():
        raise RuntimeError("attention impl 'xformers' asked for but xformers is not installed: "
                           "pip install sgengine[xformers], or keep the default 'sdpa'")
    _DEFAULT["impl"] = impl


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """Softmax attention. q: (B, H, Nq, D), k and v: (B, H, Nk, D) -> (B, H, Nq, D)."""
    impl = impl or _DEFAULT["impl"]
    if impl == "xformers" and q.is_cuda:
        import xformers.ops as xops
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) tokens -> (B, heads, N, C / heads), the layout of the attention function."""
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


class MultiHeadAttention(nn.Module):
    """Multi-head (self or cross) attention over token sequences (B, N, C).

    ``self.attend`` is the hook: a callable ``(q, k, v) -> out`` on (B, H, N, D)
    tensors. Guidance replaces it per instance to read attention maps.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} must be divisible by heads={heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attend = attention

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        k, v = self.kv(ctx).chunk(2, dim=-1)
        out = self.attend(*(split_heads(t, self.heads) for t in (self.q(x), k, v)))
        return self.proj(out.transpose(1, 2).reshape(x.shape))
