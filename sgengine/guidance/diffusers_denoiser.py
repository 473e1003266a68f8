"""diffusers UNets as engine networks (``pip install diffusers``; optional).

``DiffusersDenoiser(unet)`` gives a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` the
engine's network signature ``net(x, t, y=None, null=None)``, so ``CFG``, ``SAG`` and every sampler
drive it unchanged; its attention layers are read through ``sgengine.guidance.adapters.unet``.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn


def _diffusers_attention():
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError as err:
        raise ImportError("diffusers support needs the diffusers package: pip install diffusers") from err
    return Attention


class DiffusersDenoiser(nn.Module):
    """``DiffusersDenoiser(unet, null_context=None, null_label=None)``: eps = net(x, t, y, null).

    x: (B, C, H, W); t: (B,) timesteps of the unet's own schedule (DDPM indices). The condition
    ``y`` is the cross-attention context (B, L, D) for a ``UNet2DConditionModel`` (rows with
    ``null`` True take ``null_context``, (1, L, D) or (L, D): the empty-prompt embedding), or
    class labels (B,) int64 for a class-conditional ``UNet2DModel`` (null rows take
    ``null_label``). A learned-variance output (2C channels) returns its eps half.
    """

    def __init__(self, unet: nn.Module, null_context: torch.Tensor | None = None,
                 null_label: int | None = None):
        super().__init__()
        _diffusers_attention()
        self.net, self.null_label = unet, null_label
        self.cross = "encoder_hidden_states" in inspect.signature(unet.forward).parameters
        self.register_buffer("null_context", None if null_context is None else null_context.reshape(
            1, *null_context.shape[-2:]), persistent=False)

    def _condition(self, y, null):
        if y is None or null is None or not bool(null.any()):
            return y
        fill = self.null_context if self.cross else self.null_label
        if fill is None:
            what = "null_context=<empty-prompt embedding>" if self.cross else "null_label=<the null class id>"
            raise ValueError(f"the unconditional pass needs a null condition: DiffusersDenoiser(unet, {what})")
        fill = torch.as_tensor(fill, dtype=y.dtype, device=y.device)
        if self.cross and fill.shape[-2:] != y.shape[-2:]:
            raise ValueError(f"null_context {tuple(fill.shape[-2:])} must match the context's (L, D) = "
                             f"{tuple(y.shape[-2:])}: encode the empty prompt with the same tokenizer length")
        return torch.where(null.view(-1, *([1] * (y.dim() - 1))), fill, y)

    def forward(self, x, t, y=None, null=None):
        y = self._condition(y, null)
        if self.cross:
            if y is None:
                raise ValueError("a UNet2DConditionModel needs its context: pass y=<(B, L, D) embeddings>")
            out = self.net(x, t, encoder_hidden_states=y).sample
        else:
            out = self.net(x, t, class_labels=y).sample
        return out[:, : x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out
