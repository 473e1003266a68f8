"""Flux (``FluxTransformer2DModel``): the double-stream ``transformer_blocks.N.attn`` ([txt; img],
separate context projections and q/k RMS norms) and the single-stream
``single_transformer_blocks.N.attn`` (one concatenated [txt; img] sequence, one set of projections).
RoPE is applied to q and k before attention in both; the hook acts on the rotated tensors.

The processor mirrors diffusers' ``FluxAttnProcessor`` step for step (fused projections included)
with ``dispatch_attention_fn`` replaced by the hook's op. Image tokens are the last h*w of the
sequence in both block kinds, so text queries are never blurred nor counted (diffusers' SEG blurs
the first floor(sqrt(N))^2 tokens as a square: text tokens on a single-stream block).

Grid: Flux sees the pipeline's 2x2-packed latent as tokens; ``img_ids`` (row, column in ids[:, 1],
ids[:, 2], as ``FluxPipeline._prepare_latent_image_ids``) give (h, w), and ``patch`` = 2 maps them
to the pipeline's latent (2h, 2w). Default layer: the block at half the depth of the whole stack
(double then single blocks; ``base.middle``): ``single_transformer_blocks.9.attn`` on Flux-dev (19 + 38).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import AttentionAdapter, Hook, install_processor, is_diffusers, register
from .ops import Tokens

EXPECT = ("FluxAttnProcessor", "FluxAttnProcessor2_0")


def _projections(attn, hidden_states, encoder_hidden_states):
    if attn.fused_projections:
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        context = (attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
                   if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv") else None)
    else:
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        context = ((attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                    attn.add_v_proj(encoder_hidden_states))
                   if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None else None)
    return (q, k, v), context


class FluxProcessor:
    """diffusers' ``FluxAttnProcessor`` with the hook's attention op; ``original`` set on install."""

    def __init__(self, hook: Hook):
        self.hook, self.original = hook, None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        hook = self.hook
        if not hook.active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise ValueError(f"{hook.layer!r} was called with an attention mask: guidance needs the unmasked layer")
        from diffusers.models.embeddings import apply_rotary_emb
        (q, k, v), context = _projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.added_kv_proj_dim is not None:
            cq, ck, cv = (t.unflatten(-1, (-1, attn.head_dim)) for t in context)
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = (torch.cat([a, b], dim=1) for a, b in ((cq, q), (ck, k), (cv, v)))
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        n, img = q.shape[1], hook.image_tokens()
        tokens = Tokens(slice(n - img, n), slice(n - img, n))  # [txt; img]: image tokens last
        out = hook.run(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), tokens).transpose(1, 2)
        out = out.flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        context, out = out.split_with_sizes([encoder_hidden_states.shape[1], n - encoder_hidden_states.shape[1]], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(context.contiguous())


@register
class FluxAdapter(AttentionAdapter):
    family = "flux"
    models = "diffusers FluxTransformer2DModel (double- and single-stream blocks)"
    patch = 2  # the pipeline packs 2x2 latent pixels into one token

    @classmethod
    def claims(cls, root: nn.Module) -> bool:
        return is_diffusers(root, "FluxTransformer2DModel")

    def layers(self) -> list[str]:
        return ([f"transformer_blocks.{i}.attn" for i in range(len(self.root.transformer_blocks))]
                + [f"single_transformer_blocks.{i}.attn" for i in range(len(self.root.single_transformer_blocks))])

    def install(self, layer: str, hook: Hook) -> None:
        self.watch_root(hook, self._grid)
        install_processor(self.root.get_submodule(layer), FluxProcessor(hook), hook, EXPECT, layer)

    def _grid(self, args, kwargs) -> tuple[int, int]:
        ids, x = self.argument(args, kwargs, "img_ids"), self.argument(args, kwargs, "hidden_states")
        if ids is None:
            raise ValueError("Flux guidance needs img_ids (the token grid): call the transformer with img_ids=...")
        ids = ids[0] if ids.dim() == 3 else ids
        h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        if h * w != x.shape[1]:
            raise ValueError(f"img_ids span a {h}x{w} grid but the transformer got {x.shape[1]} image tokens: "
                             "pack the latent 2x2 as FluxPipeline does (latent sides divisible by 2)")
        return h, w
