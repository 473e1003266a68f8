"""Read the per-key self-attention mass of one layer while the network runs.

``capture_key_mass(net, layer)`` swaps the ``attend`` hook of the ``MultiHeadAttention`` named
``layer`` for ``attention_with_key_mass`` (a flash-attention forward plus a key-mass pass, never the
Nq x Nk map), so any layer is affordable, high-resolution ones included (public SAG code
materialises the map and is stuck with the lowest resolution). After a forward, ``cap.mass`` is
(B, h, w): mean over heads, sum over queries of the attention each image token receives (Hong et
al., Sec. 4: its mean is 1 for self-attention). Keys that are not image tokens are dropped: the
U-ViT's time / condition / CLS tokens and the UNet's cross-attention context tokens.

``attach_diffusers(unet, layer)`` does the same for a diffusers UNet2DModel / UNet2DConditionModel
through an attention processor (``pip install diffusers``; optional).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.attention_key_mass import attention_with_key_mass
from ..models.attention import MultiHeadAttention
from ..models.uvit import _EXTRAS, UViT


def core_network(net: nn.Module) -> nn.Module:
    """The raw network under objective wrappers (EDMPrecond, TimeScale: both keep it as ``.net``)."""
    while isinstance(getattr(net, "net", None), nn.Module):
        net = net.net
    return net


def list_attention_layers(net: nn.Module) -> list[str]:
    """Names (in ``core_network(net).named_modules()``) of the attention layers SAG can read."""
    return [name for name, m in core_network(net).named_modules() if isinstance(m, MultiHeadAttention)]


def _find(net: nn.Module, layer: str) -> MultiHeadAttention:
    modules = dict(core_network(net).named_modules())
    if not isinstance(modules.get(layer), MultiHeadAttention):
        raise KeyError(f"no attention layer named {layer!r}; available layers: "
                       f"{list_attention_layers(net)} (list them with --list-layers)")
    return modules[layer]


def _to_grid(mass: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
    """(B, Nk) -> (B, h, w): the last h*w keys are the image tokens (extras come first)."""
    if grid is None:  # no 4-D input seen: a square grid of every key
        side = math.isqrt(mass.shape[1])
        grid = (side, side)
    h, w = grid
    if h * w > mass.shape[1]:
        raise ValueError(f"attention layer has {mass.shape[1]} keys, fewer than its {h}x{w} grid")
    return mass[:, mass.shape[1] - h * w:].reshape(mass.shape[0], h, w)


def _attend_rows(q, k, v, rows: int | None, plain, backend: str):
    """Attention with the key mass of the first ``rows`` samples only (all when None): the rest
    (the conditional half of a CFG batch) takes the ``plain`` attention, skipping the mass pass."""
    n = q.shape[0] if rows is None else min(rows, q.shape[0])
    out, mass = attention_with_key_mass(q[:n], k[:n], v[:n], backend=backend)
    if n < q.shape[0]:
        out = torch.cat([out, plain(q[n:], k[n:], v[n:])])
    return out, mass


class KeyMassCapture:
    """The swapped ``attend`` hook of one attention layer; see the module docstring.

    ``active`` False runs the layer's original hook (bit-identical outputs, no mass). ``rows``
    limits the mass pass to the first ``rows`` samples of the batch (the unconditional half of
    a batched CFG forward); the other samples take the original hook.
    """

    def __init__(self, net: nn.Module, layer: str, backend: str = "auto"):
        self.layer, self.backend = layer, backend
        self.module = _find(net, layer)
        self.original = self.module.attend
        self.active, self.rows, self.mass = True, None, None
        core = core_network(net)
        side = core.cfg.img_size // core.cfg.patch if isinstance(core, UViT) else None
        self.grid = (side, side) if side else None
        parent = dict(core.named_modules())[layer.rpartition(".")[0]] if "." in layer else core
        # The UNet's attention block sees the (B, C, h, w) map: its spatial size is the grid.
        self._pre = parent.register_forward_pre_hook(self._see_grid) if side is None else None
        self.module.attend = self._attend

    def _see_grid(self, module, args) -> None:
        if args and torch.is_tensor(args[0]) and args[0].dim() == 4:
            self.grid = tuple(args[0].shape[-2:])

    def _attend(self, q, k, v):
        if not self.active:
            return self.original(q, k, v)
        out, mass = _attend_rows(q, k, v, self.rows, self.original, self.backend)
        self.mass = _to_grid(mass, self.grid)
        return out

    def close(self) -> None:
        """Restore the layer's original hook."""
        self.module.attend = self.original
        if self._pre is not None:
            self._pre.remove()

    def __enter__(self) -> "KeyMassCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def capture_key_mass(net: nn.Module, layer: str, backend: str = "auto") -> KeyMassCapture:
    """Capture the per-key mass of ``layer`` (a name from ``list_attention_layers(net)``) on every
    forward until ``close()``; use as ``with capture_key_mass(net, "mid.1.attn") as cap: ...``."""
    return KeyMassCapture(net, layer, backend)




class _DiffusersKeyMass:
    """A diffusers attention processor (self-attention only) running ``attention_with_key_mass``;
    same ``active`` / ``rows`` / ``mass`` / ``close()`` interface as ``KeyMassCapture``.

    It follows diffusers' ``AttnProcessor2_0`` step for step (spatial norm, group norm, q/k/v
    projections, q/k norms, output projection, residual, rescale) with SDPA replaced.
    """

    def __init__(self, module, layer: str, backend: str):
        self.module, self.layer, self.backend = module, layer, backend
        self.original = module.processor
        self.active, self.rows, self.mass, self.grid = True, None, None, None
        module.set_processor(self)

    def _attend(self, q, k, v):
        out, mass = _attend_rows(q, k, v, self.rows, F.scaled_dot_product_attention, self.backend)
        self.mass = _to_grid(mass, self.grid)
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


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def _qkv(attn, h: torch.Tensor):
    """(q, k, v) as (B, H, N, D) from tokens h (B, N, C), with the layer's optional q / k norms."""
    q, k, v = (_heads(proj(h), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
    q = attn.norm_q(q) if attn.norm_q is not None else q
    return q, attn.norm_k(k) if attn.norm_k is not None else k, v


def _diffusers_attention():
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError as err:
        raise ImportError("diffusers support needs the diffusers package: pip install diffusers") from err
    return Attention


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
    return _DiffusersKeyMass(dict(unet.named_modules())[layer], layer, backend)
