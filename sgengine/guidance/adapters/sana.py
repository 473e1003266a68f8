"""Sana (``SanaTransformer2DModel``): the linear self-attention ``transformer_blocks.N.attn1``
(attn2 is cross-attention to the text and is excluded). Every token is an image token.

Sana's attention (diffusers' ``SanaLinearAttnProcessor2_0``, mirrored step for step here) is
ReLU linear attention with phi = relu, per head:

    out_i = sum_j (phi(q_i) . phi(k_j)) v_j / (phi(q_i) . S + 1e-15),     S = sum_j phi(k_j),

computed as phi(Q) (phi(K)^T [V; 1]) in O(N d^2). Its attention weights are
A_ij = phi(q_i) . phi(k_j) / (phi(q_i) . S + 1e-15), so the key mass (mean over heads, sum over
queries, as for softmax layers) is

    mass_j = (1/H) sum_h phi(k_j) . u,     u = sum_i phi(q_i) / (phi(q_i) . S + 1e-15),

O(N d) per head and never an N x N map. A row with phi(q_i) . S = 0 has no weight at all (as in
the model), so the mass averages to at most 1. PAG's identity attention gives out_i = v_i (as
diffusers' ``PAGIdentitySanaLinearAttnProcessor2_0``); SEG blurs phi(Q) on the grid (the scores
phi(q_i) . phi(k_j) are linear in it, as softmax logits are in q).

Grid: the input latent (B, C, H, W) over ``patch_size``. Default layer:
``transformer_blocks.{num_layers // 2}.attn1`` (``base.middle``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import AttentionAdapter, Hook, install_processor, is_diffusers, register
from .ops import AttentionOps, Tokens, blur_tokens
from .unet import self_attention_layers

EXPECT = ("SanaLinearAttnProcessor2_0",)
EPS = 1e-15  # the model's own


# Layout of the model's processor: q (B, H, D, N), k (B, H, N, D), v (B, H, D, N); phi applied, fp32.
def plain(q, k, v):
    v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1.0)
    out = torch.matmul(torch.matmul(v, k), q)
    return out[:, :, :-1] / (out[:, :, -1:] + EPS)


def capture(q, k, v, tokens: Tokens, backend: str = "auto"):
    s = k.sum(dim=2)  # (B, H, D)
    u = (q / ((q * s.unsqueeze(-1)).sum(dim=2, keepdim=True) + EPS)).sum(dim=-1)  # (B, H, D)
    return plain(q, k, v), torch.matmul(k, u.unsqueeze(-1)).squeeze(-1).mean(dim=1)


def identity(q, k, v, tokens: Tokens):
    return v


def smoothed(q, k, v, tokens: Tokens, grid, sigma):
    return plain(blur_tokens(q.transpose(2, 3), grid, sigma).transpose(2, 3), k, v)


LINEAR = AttentionOps(plain, capture, identity, smoothed)


class SanaProcessor:
    """diffusers' ``SanaLinearAttnProcessor2_0`` with the hook's op; ``original`` set on install."""

    def __init__(self, hook: Hook):
        self.hook, self.original = hook, None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        hook = self.hook
        if not hook.active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask)
        if encoder_hidden_states is not None:
            raise ValueError(f"{hook.layer!r} was called as a cross-attention layer: guidance needs self-attention")
        dtype = hidden_states.dtype
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q = attn.norm_q(q) if attn.norm_q is not None else q
        k = attn.norm_k(k) if attn.norm_k is not None else k
        q, k, v = (t.transpose(1, 2).unflatten(1, (attn.heads, -1)) for t in (q, k, v))
        q, k, v = F.relu(q).float(), F.relu(k.transpose(2, 3)).float(), v.float()
        n = q.shape[-1]
        out = hook.run(q, k, v, Tokens(slice(0, n), slice(0, n)), LINEAR)
        out = attn.to_out[1](attn.to_out[0](out.flatten(1, 2).transpose(1, 2).to(dtype)))
        return out.clip(-65504, 65504) if dtype == torch.float16 else out


@register
class SanaAdapter(AttentionAdapter):
    family = "sana"
    models = "diffusers SanaTransformer2DModel (linear attention)"

    def __init__(self, root: nn.Module):
        super().__init__(root)
        self.patch = int(root.config.patch_size)

    @classmethod
    def claims(cls, root: nn.Module) -> bool:
        return is_diffusers(root, "SanaTransformer2DModel")

    def layers(self) -> list[str]:
        return self_attention_layers(self.root)

    def install(self, layer: str, hook: Hook) -> None:
        self.watch_latent(hook)
        install_processor(self.root.get_submodule(layer), SanaProcessor(hook), hook, EXPECT, layer)
