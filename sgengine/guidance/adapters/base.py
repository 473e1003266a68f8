"""The adapter base class, its ``Hook``, the registry list and the network unwrapping (see the
package docstring for the contract)."""
from __future__ import annotations

import inspect
import sys
from typing import ClassVar

import torch
from torch import nn

from .ops import SIGMA_INF, SOFTMAX, AttentionOps, Tokens

WRAPPER_ATTRIBUTES = ("net", "inner_model", "model", "unet", "transformer")  # engine / diffusers, k-diffusion
MODES = ("capture", "pag", "seg")
REGISTRY: list[type["AttentionAdapter"]] = []


def register(cls: type["AttentionAdapter"]) -> type["AttentionAdapter"]:
    """Class decorator: add a family to the registry (first registered = asked first)."""
    REGISTRY.append(cls)
    return cls


def core_network(net) -> nn.Module:
    """The module whose attention layers guidance reads, found through a declared protocol.

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
        raise TypeError(f"guidance reads attention layers of an nn.Module; got {type(net).__name__}: pass the "
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


def diffusers_class(name: str):
    """diffusers' class ``name``, or None when diffusers was never imported (then no network is one)."""
    module = sys.modules.get("diffusers")
    return getattr(module, name, None) if module is not None else None


def is_diffusers(root: nn.Module, *names: str) -> bool:
    classes = tuple(c for c in map(diffusers_class, names) if c is not None)
    return bool(classes) and isinstance(root, classes)


class Hook:
    """What ``capture`` / ``perturb`` return: the layer runs ``mode`` while ``active``.

    active: False runs the layer's original code (bit-identical output). rows: the slice of the
    batch that is captured / perturbed (None: all); the other samples take plain attention.
    mass: capture only, (B_rows, h, w) float32 after each forward. grid: the token grid (h, w) of
    the last forward. ``close()`` (or leaving ``with``) restores the layer.
    """

    def __init__(self, layer: str, mode: str, backend: str = "auto", sigma: float | None = None):
        self.layer, self.mode, self.backend, self.sigma = layer, mode, backend, sigma
        self.active, self.rows, self.mass, self.grid = True, None, None, None
        self.undo: list = []

    def run(self, q, k, v, tokens: Tokens, ops: AttentionOps = SOFTMAX):
        """The layer's attention on (B, H, N, D) q, k, v with this hook's mode on ``rows``."""
        start, stop, step = (slice(None) if self.rows is None else self.rows).indices(q.shape[0])
        if step != 1:
            raise ValueError(f"rows must be a contiguous slice, got {self.rows}")
        if start >= stop:
            return ops.plain(q, k, v)
        pieces = [ops.plain(q[:start], k[:start], v[:start])] if start else []
        pieces.append(self._apply(q[start:stop], k[start:stop], v[start:stop], tokens, ops))
        if stop < q.shape[0]:
            pieces.append(ops.plain(q[stop:], k[stop:], v[stop:]))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def image_tokens(self) -> int:
        """h * w of the last forward's grid (set by the root network's forward)."""
        if self.grid is None:
            raise ValueError(f"the token grid of {self.layer!r} is unknown: run the whole network (its forward "
                             "sets the grid), not the layer alone")
        return self.grid[0] * self.grid[1]

    def _apply(self, q, k, v, tokens, ops):
        if self.mode == "capture":
            out, mass = ops.capture(q, k, v, tokens, self.backend)
            self.mass = self.to_grid(mass)
            return out
        if self.mode == "pag":
            return ops.identity(q, k, v, tokens)
        self.image_tokens()  # the blur needs the grid
        return ops.smoothed(q, k, v, tokens, self.grid, self.sigma)

    def to_grid(self, mass: torch.Tensor) -> torch.Tensor:
        """(B, Ni) -> (B, h, w) on the token grid of this forward."""
        if self.image_tokens() != mass.shape[1]:
            raise ValueError(f"{self.layer!r} has {mass.shape[1]} image keys but its token grid is "
                             f"{self.grid[0]}x{self.grid[1]}")
        return mass.reshape(mass.shape[0], *self.grid)

    def close(self) -> None:
        """Restore the layer (idempotent)."""
        while self.undo:
            self.undo.pop()()

    def __enter__(self) -> "Hook":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AttentionAdapter:
    """One attention family; subclasses implement ``claims``, ``layers`` and ``install`` (put ``hook``
    on the layer, appending its undo callables to ``hook.undo``), and ``default_layer`` where half
    depth is not the right default."""

    family: ClassVar[str] = ""
    models: ClassVar[str] = ""  # what the family covers, for the unsupported-model error
    patch: int = 1

    def __init__(self, root: nn.Module):
        self.root = root

    @classmethod
    def claims(cls, root: nn.Module) -> bool:
        raise NotImplementedError

    def layers(self) -> list[str]:
        raise NotImplementedError

    @property
    def default_layer(self) -> str:
        """A transformer keeps one resolution throughout: the layer at half depth, between the early
        blocks that see patches and the late ones that render detail (UNet families override)."""
        return middle(self.layers())

    def install(self, layer: str, hook: Hook) -> None:
        raise NotImplementedError

    def capture(self, layer: str, backend: str = "auto") -> Hook:
        """Per-key mass of ``layer``'s image queries over its image keys on every forward."""
        return self._attach(Hook(self.check_layer(layer), "capture", backend=backend))

    def perturb(self, layer: str, mode: str, sigma: float | None = None) -> Hook:
        """``mode`` "pag" (identity image-image attention) or "seg" (queries blurred by ``sigma``)."""
        if mode not in ("pag", "seg"):
            raise ValueError(f"perturb mode must be 'pag' or 'seg', got {mode!r}")
        if mode == "seg" and not (sigma is not None and sigma > 0):
            raise ValueError(f"seg needs sigma > 0 (the query blur; > {SIGMA_INF} = the mean query), got {sigma}")
        return self._attach(Hook(self.check_layer(layer), mode, sigma=None if sigma is None else float(sigma)))

    def _attach(self, hook: Hook) -> Hook:
        try:
            self.install(hook.layer, hook)
        except BaseException:
            hook.close()
            raise
        return hook

    def check_layer(self, layer: str) -> str:
        """``layer`` if it is one of ``layers()``; else a one-line error naming the cause and the choice."""
        layers = self.layers()
        if layer in layers:
            return layer
        module = dict(self.root.named_modules()).get(layer) if isinstance(layer, str) else None
        if module is not None:
            raise ValueError(f"{layer!r} ({type(module).__name__}) has no image-image attention (a cross-attention "
                             f"or non-attention module): SAG, PAG and SEG need one of {layers}")
        raise KeyError(f"no attention layer named {layer!r} in {type(self.root).__name__}; available layers: {layers}"
                       if layers else f"{type(self.root).__name__} has no attention layer guidance can read")

    def watch_root(self, hook: Hook, grid_of) -> None:
        """Record ``hook.grid = grid_of(args, kwargs)`` before every forward of the root network."""
        def record(module, args, kwargs):
            hook.grid = grid_of(args, kwargs)
        hook.undo.append(self.root.register_forward_pre_hook(record, with_kwargs=True).remove)

    def argument(self, args, kwargs, name: str):
        """The root forward's argument ``name`` from a pre-hook's (args, kwargs); None if not passed."""
        if name in kwargs:
            return kwargs[name]
        index = list(inspect.signature(self.root.forward).parameters).index(name)
        return args[index] if index < len(args) else None

    def watch_latent(self, hook: Hook, name: str = "hidden_states") -> None:
        """``hook.grid`` from the root's (B, C, H, W) latent argument ``name`` over the patch size."""
        self.watch_root(hook, lambda args, kwargs: self.latent_grid(self.argument(args, kwargs, name)))

    def latent_grid(self, x: torch.Tensor) -> tuple[int, int]:
        """Token grid (h, w) of a (B, C, H, W) latent over ``self.patch``; a one-line error if it does not divide."""
        if not torch.is_tensor(x) or x.dim() != 4:
            raise ValueError(f"{type(self.root).__name__} expects a (B, C, H, W) latent, got "
                             f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        H, W, p = x.shape[-2], x.shape[-1], self.patch
        if H % p or W % p:
            raise ValueError(f"latent {H}x{W} is not divisible by the patch size {p} of {type(self.root).__name__}: "
                             f"use latent sides that are multiples of {p}")
        return H // p, W // p



def middle(names: list[str]) -> str:
    """The layer at half the stack's depth: a transformer keeps one resolution, so the UNet's
    mid-block (its most global, least textured attention) has no direct analogue; half depth is the
    stack's middle, past the early blocks that mostly see patches and before the late ones that
    render detail."""
    if not names:
        raise ValueError("this network has no image-image attention layer to guide with")
    return names[len(names) // 2]


def install_processor(module: nn.Module, processor, hook: Hook, expect: tuple[str, ...], layer: str) -> None:
    """Swap a diffusers attention processor for ``processor``; ``hook.close()`` puts the original back.

    The replacement mirrors ``expect`` (the class names of diffusers' default processors) step for
    step, so any other processor (fused projections, xformers, IP-adapter) is refused in one line.
    """
    original = module.processor
    if isinstance(getattr(original, "hook", None), Hook):
        raise ValueError(f"{layer!r} already has a guidance hook ({original.hook.mode}): close it first")
    if type(original).__name__ not in expect:
        raise TypeError(f"{layer!r} runs {type(original).__name__}; sgengine mirrors {' / '.join(expect)}: "
                        "call set_default_attn_processor() (and unfuse_qkv_projections()) first")
    processor.original = original
    module.set_processor(processor)
    hook.undo.append(lambda: module.set_processor(original))
