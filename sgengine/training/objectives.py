"""Training objectives: each pairs a loss callable, a network wrapper and its samplers.

- ``ddpm``: epsilon prediction on linear betas (self-guided diffusion), DDIM / DDPM sampling;
- ``edm``:  EDM preconditioning and loss (cluster-conditioned EDM), Heun / Euler on Karras sigmas;
- ``flow``: constant-velocity flow matching (online self-guidance), Euler / Heun / dopri5.
Guidance (CFG, SAG) wraps the *wrapped* network, so it composes the same way for all three.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..diffusion.ddpm import EpsilonLoss
from ..diffusion.samplers import ddim_sample, ddpm_sample
from ..diffusion.schedules import alphas_cumprod, linear_betas, spaced_timesteps
from ..models.unet import UNet
from ..models.uvit import UViT

OBJECTIVES = ("ddpm", "edm", "flow")


@dataclass(frozen=True)
class Objective:
    name: str
    loss: Callable  # loss(net, x, generator=None, **cond) -> (B,)
    wrap: Callable[[nn.Module], nn.Module]  # raw network -> the denoiser that is trained and sampled
    samplers: dict[str, Callable]  # name -> run(denoise, noise, steps, generator, progress) -> x0
    default_sampler: str


class TimeScale(nn.Module):
    """Feeds t * scale to the network, so t in [0, 1] spans the sinusoidal embedding's range."""

    def __init__(self, net: nn.Module, scale: float):
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x, t, **cond):
        return self.net(x, t * self.scale, **cond)


def _ddpm(cfg) -> Objective:
    abar = alphas_cumprod(linear_betas(cfg.T, cfg.beta_start, cfg.beta_end))

    def run(fn, **opts):
        return lambda d, x, steps, g, p: fn(d, x, spaced_timesteps(cfg.T, steps), alphas_cumprod=abar,
                                            generator=g, progress=p, **opts)
    return Objective("ddpm", EpsilonLoss(cfg.T, cfg.beta_start, cfg.beta_end), lambda net: net,
                     {"ddim": run(ddim_sample), "ddpm": run(ddpm_sample)}, "ddim")


def _edm(cfg) -> Objective:
    from ..diffusion.edm import EDMConfig, EDMPrecond, euler_sample, heun_sample, karras_sigmas

    e = EDMConfig()

    def run(fn):
        def go(d, x, steps, g, p):
            sigmas = karras_sigmas(steps, e.sigma_min, e.sigma_max, e.rho)
            return fn(d, x * sigmas[0], sigmas, generator=g, progress=p)  # x_N ~ N(0, sigma_max^2 I)
        return go
    return Objective("edm", e.loss(), lambda net: EDMPrecond(net, e.sigma_data),
                     {"heun": run(heun_sample), "euler": run(euler_sample)}, "heun")


def _flow(cfg) -> Objective:
    from ..diffusion.flow import FlowMatchingLoss, dopri5_flow, euler_flow, flow_times, heun_flow

    def run(fn):
        return lambda d, x, steps, g, p: fn(d, x, flow_times(steps, x.device), generator=g, progress=p)
    # The U-ViT scales flow time itself (UViTConfig.time_scale); the UNet's embedding needs it here.
    return Objective("flow", FlowMatchingLoss(), lambda net: net if isinstance(net, UViT) else TimeScale(net, 1000.0),
                     {"euler": run(euler_flow), "heun": run(heun_flow), "dopri5": run(dopri5_flow)}, "euler")


def build_network(cfg) -> nn.Module:
    """The raw network named by ``cfg.arch``: the paper's UNet or the U-ViT."""
    return UViT(cfg.uvit) if cfg.arch == "uvit" else UNet(cfg.model)


def make_objective(cfg) -> Objective:
    builders = {"ddpm": _ddpm, "edm": _edm, "flow": _flow}
    if cfg.objective not in builders:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {cfg.objective!r}")
    return builders[cfg.objective](cfg)


def run_sampler(obj: Objective, name: str | None, denoise, noise: torch.Tensor, steps: int,
                generator=None, progress: bool = False) -> torch.Tensor:
    name = name or obj.default_sampler
    if name not in obj.samplers:
        raise ValueError(f"sampler {name!r} does not fit objective {obj.name!r}; choose one of {sorted(obj.samplers)}")
    return obj.samplers[name](denoise, noise, steps, generator, progress)
