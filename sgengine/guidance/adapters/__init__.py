"""Attention adapters: one per attention family, chosen through a registry (no ``if`` on the library).

Contract (issue 19; ``sg.list_attention_layers``, ``sg.capture_key_mass``, SAG, PAG and SEG go through it)::

    adapter = adapter_for(net)      # unwraps with core_network (wrappers, pipelines' .unet / .transformer);
                                    # no family claims it -> TypeError naming the supported families
    adapter.family                  # "engine" | "unet" | "sd3" | "flux" | "pixart" (PixArt and DiT) | "sana"
    adapter.layers()                # names (root.named_modules()) of layers whose image tokens attend to image tokens
    adapter.default_layer           # documented per family (each family file says which and why)
    adapter.patch                   # latent pixels per token side (Flux: 2, the pipeline's 2x2 packing)
    hook = adapter.capture(layer, backend="auto")        # per-key mass, image queries x image keys
    hook = adapter.perturb(layer, "pag")                 # identity attention on the image-image block
    hook = adapter.perturb(layer, "seg", sigma=...)      # Gaussian blur of the image queries on their grid
                                                         # (sigma > 9999.9: their mean)
    hook.active   # False: the layer runs its original processor / hook (bit-identical output)
    hook.rows     # slice of the batch captured / perturbed (None: all); the other rows get plain attention
    hook.mass     # capture: (B_rows, h, w) float32 after each forward
    hook.grid     # (h, w) token grid of the last forward; latent = (h * patch, w * patch)
    hook.close()  # restore the layer (also ``with hook:``); idempotent

Families and default layers (``default_layer``; each family file says why):

    engine  sgengine UNet / U-ViT           the first mid-block attention ('mid.1.attn', 'mid_block.attn')
    unet    diffusers UNet2D(Condition)Model the first mid-block self-attention (as diffusers' SAG pipeline)
    sd3     SD3Transformer2DModel (SD3/3.5)  transformer_blocks.{L // 2}.attn (joint attention, half depth)
    flux    FluxTransformer2DModel           the block at half the depth of double + single blocks
                                            (single_transformer_blocks.9.attn on Flux-dev: 19 + 38)
    pixart  PixArt / DiT Transformer2DModel  transformer_blocks.{L // 2}.attn1
    sana    SanaTransformer2DModel           transformer_blocks.{L // 2}.attn1 (linear attention)

A hook is one per layer: a second capture / perturb on a hooked layer is refused until the first is
closed. ``rows`` is a contiguous slice (SAG: the unconditional half, ``slice(0, B)``; PAG / SEG in a
[uncond; cond; perturbed] batch: ``slice(2 B, 3 B)``). The grid is set by the whole network's forward
(its latent, or Flux's ``img_ids``); a layer called alone has none, and a hook that needs it says so.

Key mass: the layer's own softmax probabilities (over every key it attends to, text keys included),
summed over the image queries, mean over heads, kept at the image keys (text keys dropped, text
queries never counted); its mean over the image keys is 1 for pure self-attention, and the share
of attention the image queries give to image keys otherwise (SAG thresholds mass / mean). Computed by
``attention_with_key_mass`` (Triton on CUDA, chunked torch on CPU) on the image-query rows only,
never an N x N map. Sana's linear attention has its own O(N d) form (``sana.py``).

Perturbations act on the tensors the model's attention call receives (after q/k norms and RoPE),
so "perturbed" is the model's own attention with one substitution (``ops.py``). A hooked layer's
processor mirrors the model's default processor step for step with only the attention op replaced;
a layer running another processor (SD3's fused one, xformers, IP-adapter, a PAG processor) is refused
in one line (Flux's fused projections are mirrored).

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
