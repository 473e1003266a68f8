"""Read the per-key self-attention mass of one layer while the network runs, on any network an
attention adapter claims (``sgengine.guidance.adapters``: the engine's UNet / U-ViT, diffusers UNets
and diffusion transformers).

``capture_key_mass(net, layer)`` puts a hook on the layer that runs ``attention_with_key_mass`` (a
flash-attention forward plus a key-mass pass, never the Nq x Nk map), so any layer is affordable,
high-resolution ones included (public SAG code materialises the map and is stuck with the lowest
resolution). After a forward, ``cap.mass`` is (B, h, w): mean over heads, sum over the image queries
of the attention each image token receives (Hong et al., Sec. 4: its mean is 1 for self-attention).
Keys that are not image tokens are dropped (the U-ViT's time / condition / CLS tokens, the UNet's
cross-attention context tokens, the text tokens of joint attention), and their queries are not counted.
"""
from __future__ import annotations

from .adapters import Hook, adapter_for, core_network

__all__ = ["capture_key_mass", "core_network", "list_attention_layers"]


def list_attention_layers(net) -> list[str]:
    """Names (in ``core_network(net).named_modules()``) of the layers whose image tokens attend to
    image tokens: the ones ``capture_key_mass`` (and PAG / SEG) accept."""
    return adapter_for(net).layers()


def capture_key_mass(net, layer: str, backend: str = "auto") -> Hook:
    """Capture the per-key mass of ``layer`` (a name from ``list_attention_layers(net)``) on every
    forward until ``close()``; use as ``with capture_key_mass(net, "mid.1.attn") as cap: ...``.
    ``cap.active = False`` runs the layer unchanged; ``cap.rows`` (a slice) limits the capture."""
    return adapter_for(net).capture(layer, backend)
