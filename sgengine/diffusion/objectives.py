"""Training objectives: each pairs a loss callable, a network wrapper and its Parameterization.

- ``ddpm``: epsilon prediction on linear betas (self-guided diffusion), DDIM by default;
- ``edm``:  EDM preconditioning and loss (cluster-conditioned EDM), Heun on Karras sigmas by default;
- ``flow``: constant-velocity flow matching (online self-guidance), Euler by default.
Every sampler of ``sgengine.diffusion.samplers`` runs on every objective: the wrapped network is
adapted once to the samplers' D(x, sigma) through ``objective.param``. Guidance (CFG, SAG) wraps the
*wrapped* network, so it composes the same way for all three.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..models.unet import UNet
from ..models.uvit import UViT
from .ddpm import EpsilonLoss
from .edm import EDMConfig, EDMPrecond
from .flow import SIGMA_MIN, FlowMatchingLoss
from .param import Parameterization, edm_param, flow_param, parameterization_for
from .samplers import SAMPLERS, get_sampler
from .samplers import sample as sample_param

OBJECTIVES = ("ddpm", "edm", "flow")
DEFAULT_SAMPLER = {"ddpm": "ddim", "edm": "heun", "flow": "euler"}


@dataclass(frozen=True)
class Objective:
    name: str
    loss: Callable  # loss(net, x, generator=None, **cond) -> (B,)
    wrap: Callable[[nn.Module], nn.Module]  # raw network -> the native network that is trained and sampled
    param: Parameterization  # its prediction conversions and default sigma grid
    default_sampler: str
    clip_x0: bool = False  # clamp x0 estimates to [-1, 1] while sampling (DDIM's default for DDPM)

    @property
    def samplers(self) -> tuple[str, ...]:
        """Every sampler runs on every objective."""
        return tuple(sorted(SAMPLERS))


class TimeScale(nn.Module):
    """Feeds t * scale to the network, so t in [0, 1] spans the sinusoidal embedding's range."""

    def __init__(self, net: nn.Module, scale: float):
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x, t, **cond):
        return self.net(x, t * self.scale, **cond)

    def attention_network(self) -> nn.Module:
        """The module whose attention layers SAG reads (the guidance layer-discovery protocol)."""
        return self.net


def _identity(net: nn.Module) -> nn.Module:
    return net


def make_objective(cfg) -> Objective:
    """The objective of a config with ``objective``, ``arch``, ``T``, ``beta_start``, ``beta_end``
    and optionally ``edm`` (an EDMConfig) and ``flow_sigma_min``."""
    if cfg.objective == "ddpm":
        return Objective("ddpm", EpsilonLoss(cfg.T, cfg.beta_start, cfg.beta_end), _identity,
                         parameterization_for("ddpm", cfg), "ddim", clip_x0=True)
    if cfg.objective == "edm":
        e = getattr(cfg, "edm", None) or EDMConfig()
        return Objective("edm", e.loss(), lambda net: EDMPrecond(net, e.sigma_data),
                         edm_param(e.sigma_min, e.sigma_max, e.rho), "heun")
    if cfg.objective == "flow":
        s = getattr(cfg, "flow_sigma_min", SIGMA_MIN)
        # The U-ViT scales flow time itself (UViTConfig.time_scale); the UNet's embedding needs it here.
        wrap = _identity if cfg.arch == "uvit" else (lambda net: TimeScale(net, 1000.0))
        return Objective("flow", FlowMatchingLoss(s), wrap, flow_param(s), "euler")
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {cfg.objective!r}")


def build_network(cfg) -> nn.Module:
    """The raw network named by ``cfg.arch``: the paper's UNet or the U-ViT."""
    return UViT(cfg.uvit) if cfg.arch == "uvit" else UNet(cfg.model)


def run_sampler(obj: Objective, name: str | None, denoise, noise: torch.Tensor, steps: int,
                generator=None, progress: bool = False, callback=None) -> torch.Tensor:
    """Sample with sampler ``name`` (None: the objective's default) from the native ``denoise(x_t, t)``
    (the wrapped network, or CFG / SAG around it) on the objective's own grid of ``steps`` steps."""
    name = name or obj.default_sampler
    get_sampler(name)
    return sample_param(obj.param, denoise, noise, steps, sampler=name, generator=generator,
                        progress=progress, callback=callback, **({"clip_x0": True} if obj.clip_x0 else {}))
