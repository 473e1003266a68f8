"""Read the per-key self-attention mass of one layer while the network runs.

``capture_key_mass(net, layer)`` swaps the ``attend`` hook of the ``MultiHeadAttention`` named
``layer`` for ``attention_with_key_mass`` (a flash-attention forward plus a key-mass pass, never the
Nq x Nk map), so any layer is affordable, high-resolution ones included (public SAG code
materialises the map and is stuck with the lowest resolution). After a forward, ``cap.mass`` is
(B, h, w): mean over heads, sum over queries of the attention each image token receives (Hong et
al., Sec. 4: its mean is 1 for self-attention). Keys that are not image tokens are dropped: the
U-ViT's time / condition / CLS tokens and the UNet's cross-attention context tokens.

A diffusers UNet2DModel / UNet2DConditionModel (wrapped in ``sgengine.guidance.DiffusersDenoiser``)
is served through an attention processor instead (``sgengine.guidance.diffusers_unet``); both
functions below dispatch to it, so SAG drives either kind of network the same way.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels.attention_key_mass import attention_with_key_mass
from ..models.attention import MultiHeadAttention
from ..models.uvit import UViT


def core_network(net: nn.Module) -> nn.Module:
    """The raw network under objective wrappers (EDMPrecond, TimeScale: both keep it as ``.net``)."""
    while isinstance(getattr(net, "net", None), nn.Module):
        net = net.net
    return net


def _is_diffusers(net: nn.Module) -> bool:
    return type(core_network(net)).__module__.startswith("diffusers.")


def list_attention_layers(net: nn.Module) -> list[str]:
    """Names (in ``core_network(net).named_modules()``) of the attention layers SAG can read."""
    if _is_diffusers(net):
        from .diffusers_unet import list_diffusers_layers
        return list_diffusers_layers(core_network(net))
    return [name for name, m in core_network(net).named_modules() if isinstance(m, MultiHeadAttention)]


def _find(net: nn.Module, layer: str) -> MultiHeadAttention:
    modules = dict(core_network(net).named_modules())
    if not isinstance(modules.get(layer), MultiHeadAttention):
        raise KeyError(f"no attention layer named {layer!r}; available layers: "
                       f"{list_attention_layers(net)} (list them with --list-layers)")
    return modules[layer]


def _to_grid(mass: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
    """(B, Nk) -> (B, h, w): the last h*w keys are the image tokens (extras come first)."""
    if grid is None:  # no 4-D input seen: only a square grid of every key is unambiguous
        side = math.isqrt(mass.shape[1])
        if side * side != mass.shape[1]:
            raise ValueError(f"attention layer has {mass.shape[1]} keys and no known grid: "
                             "hook a layer whose block receives the (B, C, h, w) map")
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


def capture_key_mass(net: nn.Module, layer: str, backend: str = "auto"):
    """Capture the per-key mass of ``layer`` (a name from ``list_attention_layers(net)``) on every
    forward until ``close()``; use as ``with capture_key_mass(net, "mid.1.attn") as cap: ...``.
    A diffusers UNet gets a key-mass attention processor with the same interface."""
    if _is_diffusers(net):
        from .diffusers_unet import attach_diffusers
        return attach_diffusers(core_network(net), layer, backend)
    return KeyMassCapture(net, layer, backend)

