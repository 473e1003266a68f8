"""diffusers' ``AttnProcessor2_0`` on a self-attention layer, step for step, with the attention op
replaced by the hook's: the processor of the UNet's attn1, PixArt's and DiT's attn1 and SD3.5's
image-only attn2. Every token of such a layer is an image token."""
from __future__ import annotations

from .base import Hook
from .ops import Tokens

EXPECT = ("AttnProcessor2_0", "AttnProcessor")


def heads_of(attn, t):
    """(B, N, C) -> (B, heads, N, C / heads), as diffusers' processors reshape."""
    return t.view(t.shape[0], -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)


class SelfAttnProcessor:
    """Installed by ``install_processor``; ``original`` is set there."""

    def __init__(self, hook: Hook):
        self.hook, self.original = hook, None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        hook = self.hook
        if not hook.active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{hook.layer!r} was called as a cross-attention or masked layer: guidance needs "
                             "image-image self-attention here")
        residual = hidden_states
        h = attn.spatial_norm(hidden_states, temb) if attn.spatial_norm is not None else hidden_states
        ndim, shape = h.ndim, h.shape
        if ndim == 4:
            hook.grid = tuple(h.shape[-2:])
            h = h.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
        q, k, v = (heads_of(attn, proj(h)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        q = attn.norm_q(q) if attn.norm_q is not None else q
        k = attn.norm_k(k) if attn.norm_k is not None else k
        n = q.shape[2]
        out = hook.run(q, k, v, Tokens(slice(0, n), slice(0, n)))
        out = out.transpose(1, 2).reshape(out.shape[0], -1, attn.heads * out.shape[-1]).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.transpose(-1, -2).reshape(shape) if ndim == 4 else out
        out = out + residual if attn.residual_connection else out
        return out / attn.rescale_output_factor
