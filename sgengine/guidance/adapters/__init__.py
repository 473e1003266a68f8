"""Attention adapters: one per attention family, chosen through a registry (no ``if`` on the library).

Contract (issue 19; ``sg.list_attention_layers``, ``sg.capture_key_mass``, SAG, PAG and SEG go through it)::

    adapter = adapter_for(net)      # unwraps with core_network (wrappers, pipelines' .unet / .transformer);
                                    # no family claims it -> TypeError naming the supported families
    adapter.family                  # "engine" | "unet" | "sd3" | "flux" | "pixart" | "sana"
    adapter.layers()                # names (root.named_modules()) of layers whose image tokens attend to image tokens
    adapter.default_layer           # documented per family (each family file says which and why)
    adapter.patch                   # latent pixels per token side (Flux: 2, the pipeline's 2x2 packing)
    hook = adapter.capture(layer, backend="auto")        # per-key mass, image queries x image keys
    hook = adapter.perturb(layer, "pag")                 # identity attention on the image-image block
    hook = adapter.perturb(layer, "seg", sigma=...)      # Gaussian blur of the image queries on their grid
    hook.active   # False: the layer runs its original processor / hook (bit-identical output)
    hook.rows     # slice of the batch captured / perturbed (None: all); the other rows get plain attention
    hook.mass     # capture: (B_rows, h, w) float32 after each forward
    hook.grid     # (h, w) token grid of the last forward; latent = (h * patch, w * patch)
    hook.close()  # restore the layer (also ``with hook:``); idempotent

Key mass: the layer's own softmax probabilities (over every key it attends to, text keys included),
summed over the image queries, mean over heads, kept at the image keys (text keys dropped, text
queries never counted); its mean over the image keys is 1 for pure self-attention. Computed by
``attention_with_key_mass`` (Triton on CUDA, chunked torch on CPU) on the image-query rows only,
never an N x N map. Sana's linear attention has its own O(N d) form (``sana.py``).

Perturbations act on the tensors the model's attention call receives (after q/k norms and RoPE),
so "perturbed" is the model's own attention with one substitution (``ops.py``). A hooked layer's
processor mirrors the model's default processor step for step with only the attention op replaced;
a layer running another processor (fused, xformers, IP-adapter) is refused in one line.

Errors (one line each): an unsupported network (TypeError, names the families), a layer name that
does not exist (KeyError, lists the layers), a module without image-image attention such as a
cross-attention layer (ValueError), a latent the patch size does not divide (ValueError at the forward).

Adding a family is one new file: subclass ``AttentionAdapter`` (``claims``, ``layers``,
``default_layer``, ``install``), decorate it with ``@register`` and import it below (order = priority).
"""
from __future__ import annotations

from .base import REGISTRY, AttentionAdapter, Hook, core_network, register
from . import engine, flux, pixart, sana, sd3, unet  # noqa: F401  (registration: one file per family)


def adapter_for(net) -> AttentionAdapter:
    """The adapter of the family that claims ``core_network(net)``."""
    root = core_network(net)
    for cls in REGISTRY:
        if cls.claims(root):
            return cls(root)
    supported = "; ".join(f"{cls.family}: {cls.models}" for cls in REGISTRY)
    raise TypeError(f"{type(root).__name__} is not a supported attention family; supported: {supported}")


__all__ = ["AttentionAdapter", "Hook", "REGISTRY", "adapter_for", "core_network", "register"]
