"""What ``sg.sag`` / ``sg.pag`` / ``sg.seg`` need to know about each diffusers pipeline: one
``PipelineKind`` entry per pipeline in a registry (``register_pipeline``), never an ``if`` chain.

An entry says which module denoises (``pipe.unet`` / ``pipe.transformer``), the name of that
forward's latent argument, how the pipeline's own CFG batch is recognised and ordered, the
forward's arguments that carry no batch dimension, how the forward's ``timestep`` maps to the
scheduler's timestep (the native time of ``scheduler_param``), whether the latent is packed into
2x2 tokens (Flux) and, for the scheduler's grid, the unshifted sigmas the pipeline hands it.

The pipeline's CFG batch is [uncond; cond] (DiT: [cond; uncond]) of identical latents. Pipelines that
keep a ``do_classifier_free_guidance`` flag are read through it; PixArt-Sigma and DiT decide it
locally, so there a batch is CFG when its two halves have identical latents (a batch of images
that share one noise and differ only by prompt is then read as CFG too: give them different noise).
Flux runs its "true CFG" as two separate forwards, so every Flux forward is guided on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .schedulers import flux_sigmas


def pipeline_flag(pipe, x) -> bool:
    """The pipeline's own ``do_classifier_free_guidance`` (set from guidance_scale at each call)."""
    return bool(pipe.do_classifier_free_guidance)


def equal_halves(pipe, x) -> bool:
    """A CFG batch for pipelines that decide CFG locally: the two halves hold the same latents."""
    n = x.shape[0] // 2
    return x.shape[0] % 2 == 0 and n > 0 and torch.equal(x[:n], x[n:])


def never(pipe, x) -> bool:
    return False


def pack_2x2(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/2)(W/2), 4C): Flux's packing of 2x2 latent patches into tokens."""
    B, C, H, W = latent.shape
    x = latent.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_2x2(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h w, 4C) tokens on the (h, w) grid -> (B, C, 2h, 2w): the inverse of ``pack_2x2``."""
    (B, _, C4), (h, w) = tokens.shape, grid
    x = tokens.view(B, h, w, C4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C4 // 4, 2 * h, 2 * w)


@dataclass(frozen=True)
class PipelineKind:
    pipelines: tuple[str, ...]  # diffusers class names
    denoiser: str  # the pipeline attribute holding the denoising network
    sample: str  # that network's latent argument
    cfg: Callable = pipeline_flag  # (pipe, x) -> is this forward the pipeline's [uncond; cond] batch
    cond_first: bool = False  # the CFG batch is [cond; uncond] (DiT)
    unbatched: tuple[str, ...] = ()  # forward arguments without a batch dimension
    timestep_scale: Callable = field(default=lambda pipe: 1.0)  # scheduler timestep = forward timestep * this
    packed: bool = False  # Flux: the latent is (B, N, 4C) tokens of 2x2 patches
    sigmas: Callable | None = None  # the unshifted grid the pipeline hands its scheduler (None: the default)

    def to_latent(self, x: torch.Tensor, grid) -> torch.Tensor:
        return unpack_2x2(x, grid) if self.packed else x

    def from_latent(self, latent: torch.Tensor) -> torch.Tensor:
        return pack_2x2(latent) if self.packed else latent


PIPELINES: list[PipelineKind] = []


def register_pipeline(kind: PipelineKind) -> PipelineKind:
    PIPELINES.append(kind)
    return kind


def kind_of(pipe) -> PipelineKind:
    """The registered entry of ``pipe``'s class (or of its nearest registered base class)."""
    names = [cls.__name__ for cls in type(pipe).__mro__]
    for name in names:
        for kind in PIPELINES:
            if name in kind.pipelines:
                return kind
    supported = ", ".join(n for kind in PIPELINES for n in kind.pipelines)
    raise TypeError(f"{type(pipe).__name__} is not a supported pipeline; supported: {supported}")


register_pipeline(PipelineKind(("StableDiffusionPipeline", "StableDiffusionXLPipeline"), "unet", "sample"))
register_pipeline(PipelineKind(("StableDiffusion3Pipeline",), "transformer", "hidden_states"))
register_pipeline(PipelineKind(("FluxPipeline",), "transformer", "hidden_states", cfg=never,
                               unbatched=("txt_ids", "img_ids"), timestep_scale=lambda pipe: 1000.0,
                               packed=True, sigmas=flux_sigmas))
register_pipeline(PipelineKind(("PixArtSigmaPipeline",), "transformer", "hidden_states", cfg=equal_halves))
register_pipeline(PipelineKind(("SanaPipeline",), "transformer", "hidden_states",
                               timestep_scale=lambda pipe: 1.0 / pipe.transformer.config.timestep_scale))
register_pipeline(PipelineKind(("DiTPipeline",), "transformer", "hidden_states", cfg=equal_halves, cond_first=True))
