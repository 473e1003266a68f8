"""The engine's own networks: every ``MultiHeadAttention`` (UNet attention blocks, U-ViT blocks).

The hook swaps the layer's per-instance ``attend(q, k, v)`` hook. Image tokens are the last h*w of
both sequences: the U-ViT prepends time / condition / CLS tokens (their queries are not counted,
their keys are dropped), the UNet's cross-attention blocks prepend context tokens to the keys.
Grid: the U-ViT's input latent over its patch; the UNet's attention block receives the (B, C, h, w)
map itself. Default layer: the first mid-block attention ('mid.1.attn', 'mid_block.attn'), the
lowest resolution, where SAG's mask is read in the paper.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ...models.attention import MultiHeadAttention
from ...models.uvit import UViT
from .base import AttentionAdapter, Hook, register
from .ops import SOFTMAX, Tokens


@register
class EngineAdapter(AttentionAdapter):
    family = "engine"
    models = "sgengine UNet / U-ViT (MultiHeadAttention)"

    def __init__(self, root: nn.Module):
        super().__init__(root)
        self.patch = root.cfg.patch if isinstance(root, UViT) else 1

    @classmethod
    def claims(cls, root: nn.Module) -> bool:
        return any(isinstance(m, MultiHeadAttention) for m in root.modules())

    def layers(self) -> list[str]:
        return [name for name, m in self.root.named_modules() if isinstance(m, MultiHeadAttention)]

    @property
    def default_layer(self) -> str:
        mid = [name for name in self.layers() if name.startswith("mid")]
        if not mid:
            raise ValueError(f"no mid-block attention layer to guide with: pass the layer, one of {self.layers()}")
        return mid[0]

    def install(self, layer: str, hook: Hook) -> None:
        modules = dict(self.root.named_modules())
        module, original = modules[layer], modules[layer].attend
        if getattr(original, "hook", None) is not None:
            raise ValueError(f"{layer!r} already has a guidance hook ({original.hook.mode}): close it first")
        ops = dataclasses.replace(SOFTMAX, plain=original)

        def attend(q, k, v):
            if not hook.active:
                return original(q, k, v)
            n = hook.image_tokens()
            tokens = Tokens(slice(q.shape[2] - n, q.shape[2]), slice(k.shape[2] - n, k.shape[2]))
            return hook.run(q, k, v, tokens, ops)

        if isinstance(self.root, UViT):
            self.watch_latent(hook, "x")
        else:  # the UNet's attention block sees the (B, C, h, w) map: its spatial size is the grid
            parent = modules[layer.rpartition(".")[0]] if "." in layer else self.root
            hook.undo.append(parent.register_forward_pre_hook(lambda m, args: _see_grid(hook, args)).remove)
        attend.hook = hook
        module.attend = attend
        hook.undo.append(lambda: setattr(module, "attend", original))


def _see_grid(hook: Hook, args) -> None:
    if args and torch.is_tensor(args[0]) and args[0].dim() == 4:
        hook.grid = tuple(args[0].shape[-2:])
