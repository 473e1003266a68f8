"""The attention ops an adapter's hook runs in place of the layer's own softmax attention.

All take q: (B, H, Nq, D), k, v: (B, H, Nk, D), the tensors exactly as the model's processor hands
them to its attention call (after q/k norms and RoPE), and a ``Tokens`` record of where the image
tokens sit in the query and key sequences. Text (or time / class / CLS) tokens are never part of
the key mass, and their queries are never perturbed.

- ``capture``: attention output (equal to SDPA's) and the key mass of the image queries over the
  image keys (B, Ni): mass[b, j] = (1/H) sum_h sum_{i in img} softmax(q_i k^T * scale)[b, h, j],
  the softmax over every key the layer attends to (its text keys included), kept at image keys.
  ``attention_with_key_mass`` (Triton on CUDA, chunked torch on CPU) on the image-query rows only:
  never an Nq x Nk map.
- ``identity`` (PAG, Ahn et al. 2024): the image-image block of the attention map becomes the
  identity; an image query still attends to the text keys (softmax over {its own key} + text keys),
  and text queries keep their full attention. Without text keys the output of image query i is v_i.
- ``smoothed`` (SEG, Hong 2024): the image queries, on their (h, w) grid, get a Gaussian blur of
  ``sigma`` (reflect padding; kernel ceil(6 sigma) + 1, odd, at most the shorter grid side); sigma
  above ``SIGMA_INF`` replaces them by their mean. The blur is applied to the query that enters the
  softmax (after q-norm and RoPE), so blur(Q) K^T is the blurred energy of the paper exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...kernels import attention_with_key_mass, gaussian_blur_ref

SIGMA_INF = 9999.9  # as diffusers' SEG: a larger sigma means "infinite blur", the mean query


@dataclass(frozen=True)
class Tokens:
    """Where the image tokens sit: ``q`` in the query sequence, ``k`` in the key sequence."""
    q: slice
    k: slice

    def others(self, n: int, which: str) -> list[slice]:
        """The non-image slices of a sequence of ``n`` tokens (before and after the image block)."""
        s = self.q if which == "q" else self.k
        start, stop, _ = s.indices(n)
        return [piece for piece in (slice(0, start), slice(stop, n)) if piece.stop > piece.start]


def _merge(parts: list[tuple[slice, torch.Tensor]], dim: int) -> torch.Tensor:
    """Concatenate pieces in sequence order (each piece tagged with its slice)."""
    return torch.cat([t for _, t in sorted(parts, key=lambda p: p[0].start)], dim=dim)


def plain(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def _by_queries(q, k, v, tokens: Tokens, image_rows):
    """Image query rows through ``image_rows(q_img)``, the other query rows through plain SDPA."""
    out_img = image_rows(q[:, :, tokens.q])
    parts = [(tokens.q, out_img)] + [(s, plain(q[:, :, s], k, v)) for s in tokens.others(q.shape[2], "q")]
    return _merge(parts, dim=2)


def capture(q, k, v, tokens: Tokens, backend: str = "auto"):
    """(out, mass): out equals SDPA; mass (B, Ni) of the image queries at the image keys."""
    found = {}

    def image_rows(qi):
        out, mass = attention_with_key_mass(qi, k, v, backend=backend)
        found["mass"] = mass[:, tokens.k]
        return out
    return _by_queries(q, k, v, tokens, image_rows), found["mass"]


def identity(q, k, v, tokens: Tokens):
    """PAG: the image-image block of the map is the identity (see the module docstring)."""
    def image_rows(qi):
        ki, vi = k[:, :, tokens.k], v[:, :, tokens.k]
        if qi.shape[2] != ki.shape[2]:
            raise ValueError(f"identity attention needs as many image queries as image keys, got "
                             f"{qi.shape[2]} and {ki.shape[2]}")
        text = tokens.others(k.shape[2], "k")
        if not text:
            return vi.to(qi.dtype)
        kt = torch.cat([k[:, :, s] for s in text], dim=2)
        vt = torch.cat([v[:, :, s] for s in text], dim=2)
        scale = 1.0 / math.sqrt(qi.shape[-1])
        own = (qi * ki).sum(-1, keepdim=True) * scale
        p = torch.softmax(torch.cat([own, qi @ kt.transpose(-2, -1) * scale], dim=-1).float(), dim=-1)
        return (p[..., :1] * vi.float() + p[..., 1:] @ vt.float()).to(qi.dtype)
    return _by_queries(q, k, v, tokens, image_rows)


def blur_tokens(x: torch.Tensor, grid: tuple[int, int], sigma: float) -> torch.Tensor:
    """Gaussian blur of tokens x (B, H, h*w, D) on their (h, w) grid, row-major."""
    B, H, n, D = x.shape
    h, w = grid
    if h * w != n:
        raise ValueError(f"{n} image tokens do not fill the {h}x{w} grid")
    if sigma > SIGMA_INF:
        return x.mean(dim=2, keepdim=True).expand_as(x).contiguous()
    side = min(h, w)
    size = min(math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2, side - (side % 2 == 0))
    if size <= 1:
        return x
    maps = x.permute(0, 1, 3, 2).reshape(B, H * D, h, w)
    return gaussian_blur_ref(maps, size, sigma).reshape(B, H, D, n).permute(0, 1, 3, 2)


def smoothed(q, k, v, tokens: Tokens, grid: tuple[int, int], sigma: float):
    """SEG: softmax attention with the image queries blurred on their grid."""
    pieces = [(tokens.q, blur_tokens(q[:, :, tokens.q], grid, sigma))]
    pieces += [(s, q[:, :, s]) for s in tokens.others(q.shape[2], "q")]
    return plain(_merge(pieces, dim=2), k, v)


@dataclass(frozen=True)
class AttentionOps:
    """One attention form's ops (softmax here; Sana's linear attention has its own)."""
    plain: object
    capture: object
    identity: object
    smoothed: object


SOFTMAX = AttentionOps(plain, capture, identity, smoothed)
