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

import torch
from torch import nn

from ..models.attention import MultiHeadAttention
from ..models.uvit import UViT
from .keymass import attend_rows, mass_to_grid


WRAPPER_ATTRIBUTES = ("net", "inner_model", "model", "unet")  # engine / diffusers, k-diffusion, common wrappers


def core_network(net) -> nn.Module:
    """The module whose attention layers SAG reads, found through a declared protocol.

    An object (module or not) that declares ``attention_network()`` is unwrapped through it (the
    engine's EDMPrecond and TimeScale do; declare it on your own wrapper). Otherwise an
    ``nn.Module`` without parameters of its own around exactly the ones of a child in
    ``WRAPPER_ATTRIBUTES`` (``.net``: DiffusersDenoiser, CFG; ``.inner_model``: k-diffusion
    wrappers) is unwrapped through that child. What remains must be an ``nn.Module``.
    """
    for _ in range(32):  # a wrapper chain, never a cycle
        declared = getattr(net, "attention_network", None)
        inner = declared() if callable(declared) else _wrapped(net)
        if inner is None:
            break
        net = inner
    if not isinstance(net, nn.Module):
        raise TypeError(f"SAG reads attention layers of an nn.Module; got {type(net).__name__}: pass the "
                        "network itself, or give your wrapper an attention_network() method returning it")
    return net


def _wrapped(obj):
    """The child that a parameter-free wrapper wraps (None: ``obj`` is the network itself)."""
    for name in WRAPPER_ATTRIBUTES:
        child = getattr(obj, name, None)
        if isinstance(child, nn.Module) and child is not obj:
            own = {id(p) for p in obj.parameters()} if isinstance(obj, nn.Module) else set()
            if own <= {id(p) for p in child.parameters()}:
                return child
    return None


def _is_diffusers(root: nn.Module) -> bool:
    return any(type(m).__module__.startswith("diffusers.") and type(m).__name__ == "Attention"
               for m in root.modules())


def list_attention_layers(net) -> list[str]:
    """Names (in ``core_network(net).named_modules()``) of the self-attention layers SAG can read:
    the engine's ``MultiHeadAttention`` or diffusers' ``Attention`` (cross-attention excluded)."""
    root = core_network(net)
    if _is_diffusers(root):
        from .diffusers_unet import list_diffusers_layers
        return list_diffusers_layers(root)
    return [name for name, m in root.named_modules() if isinstance(m, MultiHeadAttention)]


def _find(net, layer: str) -> MultiHeadAttention:
    modules = dict(core_network(net).named_modules())
    if not isinstance(modules.get(layer), MultiHeadAttention):
        layers = list_attention_layers(net)
        raise KeyError(f"no attention layer named {layer!r}; available layers: {layers}" if layers else
                       f"{type(core_network(net)).__name__} has no attention layer SAG can read")
    return modules[layer]


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
        out, mass = attend_rows(q, k, v, self.rows, self.original, self.backend)
        self.mass = mass_to_grid(mass, self.grid)
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
    root = core_network(net)
    if _is_diffusers(root):
        from .diffusers_unet import attach_diffusers
        return attach_diffusers(root, layer, backend)
    return KeyMassCapture(root, layer, backend)

