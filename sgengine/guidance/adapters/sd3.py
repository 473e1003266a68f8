"""SD3 / SD3.5 (``SD3Transformer2DModel``, MMDiT): the joint attention ``transformer_blocks.N.attn``
over [img; txt] (separate context projections, q/k norms and SD3.5's ``rms_norm`` kept) and SD3.5's
image-only ``transformer_blocks.N.attn2`` (the blocks in ``dual_attention_layers``).

The processor mirrors diffusers' ``JointAttnProcessor2_0`` step for step (both layer kinds run it;
attn2 is called without context). The perturbed path is therefore the model's own attention with
one substitution: unlike diffusers' ``PAGJointAttnProcessor2_0``, which drops ``norm_q`` / ``norm_k``
/ ``norm_added_q`` / ``norm_added_k``, so on SD3.5 its "perturbed" branch is not SD3.5's attention.

Grid: the input latent (B, C, H, W) over ``patch_size``. Default layer: the joint attention of the
block at half depth (``transformer_blocks.{num_layers // 2}.attn``; ``base.middle``).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import AttentionAdapter, Hook, install_processor, is_diffusers, middle, register
from .ops import Tokens
from .selfattn import heads_of

EXPECT = ("JointAttnProcessor2_0",)


class JointProcessor:
    """diffusers' ``JointAttnProcessor2_0`` with the hook's attention op; ``original`` set on install."""

    def __init__(self, hook: Hook):
        self.hook, self.original = hook, None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        hook = self.hook
        if not hook.active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if attention_mask is not None:
            raise ValueError(f"{hook.layer!r} was called with an attention mask: guidance needs the unmasked layer")
        n = hidden_states.shape[1]
        q, k, v = (heads_of(attn, proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        q = attn.norm_q(q) if attn.norm_q is not None else q
        k = attn.norm_k(k) if attn.norm_k is not None else k
        if encoder_hidden_states is not None:
            cq, ck, cv = (heads_of(attn, proj(encoder_hidden_states))
                          for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            cq = attn.norm_added_q(cq) if attn.norm_added_q is not None else cq
            ck = attn.norm_added_k(ck) if attn.norm_added_k is not None else ck
            q, k, v = (torch.cat([a, b], dim=2) for a, b in ((q, cq), (k, ck), (v, cv)))
        out = hook.run(q, k, v, Tokens(slice(0, n), slice(0, n)))  # [img; txt]: image tokens first
        out = out.transpose(1, 2).reshape(out.shape[0], -1, attn.heads * out.shape[-1]).to(q.dtype)
        context = None
        if encoder_hidden_states is not None:
            out, context = out[:, :n], out[:, n:]
            context = context if attn.context_pre_only else attn.to_add_out(context)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if encoder_hidden_states is None else (out, context)


@register
class SD3Adapter(AttentionAdapter):
    family = "sd3"
    models = "diffusers SD3Transformer2DModel (SD3, SD3.5)"

    def __init__(self, root: nn.Module):
        super().__init__(root)
        self.patch = int(root.config.patch_size)

    @classmethod
    def claims(cls, root: nn.Module) -> bool:
        return is_diffusers(root, "SD3Transformer2DModel")

    def layers(self) -> list[str]:
        out = []
        for i, block in enumerate(self.root.transformer_blocks):
            out += [f"transformer_blocks.{i}.attn"] + ([f"transformer_blocks.{i}.attn2"]
                                                       if getattr(block, "attn2", None) is not None else [])
        return out

    @property
    def default_layer(self) -> str:
        return middle([name for name in self.layers() if name.endswith(".attn")])

    def install(self, layer: str, hook: Hook) -> None:
        self.watch_latent(hook)
        install_processor(self.root.get_submodule(layer), JointProcessor(hook), hook, EXPECT, layer)
