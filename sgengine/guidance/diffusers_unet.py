"""Guidance on diffusers UNets (``pip install diffusers``; optional).

``DiffusersDenoiser(unet)`` gives a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` the
engine's network signature ``net(x, t, y=None, null=None)``, so ``CFG``, ``SAG`` and every sampler
drive it unchanged. ``attach_diffusers(unet, layer)`` installs an attention processor that runs
``attention_with_key_mass`` on one self-attention layer: SAG reads the mask there without the
materialised Nq x Nk map (diffusers' own SAG pipeline stores the whole probability tensor).
``capture_key_mass`` / ``list_attention_layers`` dispatch here for such networks.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from ..models.attention import split_heads
from .keymass import attend_rows, mass_to_grid


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


class _DiffusersKeyMass:
    """A diffusers attention processor (self-attention only) running ``attention_with_key_mass``;
    same ``active`` / ``rows`` / ``mass`` / ``close()`` interface as ``KeyMassCapture``.

    It follows diffusers' ``AttnProcessor2_0`` step for step (spatial norm, group norm, q/k/v
    projections, q/k norms, output projection, residual, rescale) with SDPA replaced.
    """

    def __init__(self, module, layer: str, backend: str, ancestors=()):
        self.module, self.layer, self.backend = module, layer, backend
        self.original = module.processor
        self.active, self.rows, self.mass, self.grid = True, None, None, None
        # A self-attention inside a Transformer2DModel sees flattened (B, h*w, C) tokens: the grid
        # is the spatial size of the nearest enclosing module called with the 4-D map. Every
        # ancestor runs before the layer on each forward, so each hook's record is current.
        self._seen: list = [None] * len(ancestors)
        self._hooks = [m.register_forward_pre_hook(self._recorder(i), with_kwargs=True)
                       for i, m in enumerate(ancestors)]
        module.set_processor(self)

    def _recorder(self, depth: int):
        def record(module, args, kwargs) -> None:
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
            self._seen[depth] = tuple(x.shape[-2:]) if torch.is_tensor(x) and x.dim() == 4 else None
        return record

    def _token_grid(self, n: int) -> tuple[int, int]:
        grid = next((g for g in reversed(self._seen) if g is not None), None)
        if grid is None or grid[0] * grid[1] != n:
            raise ValueError(f"{self.layer!r} has {n} tokens but its enclosing map is "
                             f"{'unknown' if grid is None else '%dx%d' % grid}: SAG needs a self-attention "
                             "layer whose block receives the (B, C, h, w) map (list_diffusers_layers(unet))")
        return grid

    def _attend(self, q, k, v):
        out, mass = attend_rows(q, k, v, self.rows, F.scaled_dot_product_attention, self.backend)
        self.mass = mass_to_grid(mass, self.grid)
        return out

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if not self.active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{self.layer!r} is a cross-attention or masked layer: SAG reads self-attention; "
                             "pick a name from list_diffusers_layers(unet)")
        residual, shape = hidden_states, hidden_states.shape
        h = attn.spatial_norm(hidden_states, temb) if attn.spatial_norm is not None else hidden_states
        if h.ndim == 4:
            self.grid = tuple(h.shape[-2:])
            h = h.flatten(2).transpose(1, 2)
        else:
            self.grid = self._token_grid(h.shape[1])
        if attn.group_norm is not None:
            h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
        q, k, v = _qkv(attn, h)
        out = self._attend(q, k, v).transpose(1, 2).flatten(2).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.transpose(1, 2).reshape(shape) if len(shape) == 4 else out
        out = out + residual if attn.residual_connection else out
        return out / attn.rescale_output_factor

    def close(self) -> None:
        self.module.set_processor(self.original)
        for hook in self._hooks:
            hook.remove()

    def __enter__(self) -> "_DiffusersKeyMass":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _qkv(attn, h: torch.Tensor):
    """(q, k, v) as (B, H, N, D) from tokens h (B, N, C), with the layer's optional q / k norms."""
    q, k, v = (split_heads(proj(h), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
    q = attn.norm_q(q) if attn.norm_q is not None else q
    return q, attn.norm_k(k) if attn.norm_k is not None else k, v


def list_diffusers_layers(unet: nn.Module) -> list[str]:
    """Self-attention layers of a diffusers UNet2DModel / UNet2DConditionModel, by module name."""
    attention = _diffusers_attention()
    return [name for name, m in unet.named_modules() if isinstance(m, attention) and not m.is_cross_attention]


def attach_diffusers(unet: nn.Module, layer: str, backend: str = "auto") -> _DiffusersKeyMass:
    """Install a key-mass attention processor on ``layer`` of a diffusers UNet; ``.mass`` is
    (B, h, w) after each forward, ``.close()`` restores the original processor."""
    layers = list_diffusers_layers(unet)
    if layer not in layers:
        raise KeyError(f"no self-attention layer named {layer!r}; available layers: {layers}")
    modules = dict(unet.named_modules())
    parts = layer.split(".")
    ancestors = [modules[".".join(parts[:i])] for i in range(1, len(parts))]  # outermost first
    return _DiffusersKeyMass(modules[layer], layer, backend, ancestors)
