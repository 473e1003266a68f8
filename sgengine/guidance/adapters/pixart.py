"""PixArt-alpha / Sigma (``PixArtTransformer2DModel``) and DiT (``DiTTransformer2DModel``): the
self-attention ``transformer_blocks.N.attn1`` of their ``BasicTransformerBlock`` (PixArt's attn2 is
cross-attention to the text and is excluded). The processor mirrors ``AttnProcessor2_0``
(``selfattn``). Every token is an image token.

Grid: the input latent (B, C, H, W) over ``patch_size``. (diffusers' DiT unpatchifies with
height = width = sqrt(N), so DiT itself only runs square latents; PixArt runs any.) A learned sigma
(2C output channels) is the pipelines' concern: guidance uses the eps half. Default layer:
``transformer_blocks.{num_layers // 2}.attn1`` (``base.middle``).
"""
from __future__ import annotations

from torch import nn

from .base import AttentionAdapter, Hook, install_processor, is_diffusers, register
from .selfattn import EXPECT, SelfAttnProcessor
from .unet import self_attention_layers


@register
class PixArtAdapter(AttentionAdapter):
    family = "pixart"
    models = "diffusers PixArtTransformer2DModel / DiTTransformer2DModel"

    def __init__(self, root: nn.Module):
        super().__init__(root)
        self.patch = int(root.config.patch_size)

    @classmethod
    def claims(cls, root: nn.Module) -> bool:
        return is_diffusers(root, "PixArtTransformer2DModel", "DiTTransformer2DModel")

    def layers(self) -> list[str]:
        return self_attention_layers(self.root)

    def install(self, layer: str, hook: Hook) -> None:
        self.watch_latent(hook)
        install_processor(self.root.get_submodule(layer), SelfAttnProcessor(hook), hook, EXPECT, layer)
