"""diffusers UNets (``UNet2DModel``, ``UNet2DConditionModel``: SD 1.x / 2.x, SDXL): the self-attention
layers (``attn1`` of the transformer blocks, the attention of ``AttnDownBlock2D`` ...), cross-attention
(``attn2``) excluded. The processor mirrors ``AttnProcessor2_0`` (``selfattn``).

Grid: a layer inside a ``Transformer2DModel`` sees flattened (B, h*w, C) tokens, so the grid is the
spatial size of the nearest enclosing module called with the 4-D map (every ancestor runs before
the layer on each forward, so each record is current); a layer called with the 4-D map reads it
directly. Default layer: the first mid-block self-attention
('mid_block.attentions.0.transformer_blocks.0.attn1' on SD / SDXL), as diffusers' SAG pipeline.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import AttentionAdapter, Hook, diffusers_class, install_processor, is_diffusers, register
from .selfattn import EXPECT, SelfAttnProcessor


def self_attention_layers(root: nn.Module) -> list[str]:
    """Names of diffusers ``Attention`` modules that are not cross-attention."""
    attention = diffusers_class("Attention") or _attention_class()
    return [name for name, m in root.named_modules() if isinstance(m, attention) and not m.is_cross_attention]


def _attention_class():
    from diffusers.models.attention_processor import Attention
    return Attention


@register
class UNetAdapter(AttentionAdapter):
    family = "unet"
    models = "diffusers UNet2DModel / UNet2DConditionModel (SD, SDXL)"

    @classmethod
    def claims(cls, root: nn.Module) -> bool:
        return is_diffusers(root, "UNet2DModel", "UNet2DConditionModel")

    def layers(self) -> list[str]:
        return self_attention_layers(self.root)

    @property
    def default_layer(self) -> str:
        mid = [name for name in self.layers() if name.startswith("mid_block")]
        if not mid:
            raise ValueError(f"{type(self.root).__name__} has no mid-block self-attention: pass the layer, "
                             f"one of {self.layers()}")
        return mid[0]

    def install(self, layer: str, hook: Hook) -> None:
        modules = dict(self.root.named_modules())
        parts = layer.split(".")
        ancestors = [modules[".".join(parts[:i])] for i in range(1, len(parts))]  # outermost first
        seen: list = [None] * len(ancestors)

        def recorder(depth: int):
            def record(module, args, kwargs) -> None:
                x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
                seen[depth] = tuple(x.shape[-2:]) if torch.is_tensor(x) and x.dim() == 4 else None
                hook.grid = next((g for g in reversed(seen) if g is not None), None)
            return record
        for i, m in enumerate(ancestors):
            hook.undo.append(m.register_forward_pre_hook(recorder(i), with_kwargs=True).remove)
        install_processor(modules[layer], SelfAttnProcessor(hook), hook, EXPECT, layer)
