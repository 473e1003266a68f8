"""Noise schedules as pure functions (DDPM, Ho et al. 2020)."""
from __future__ import annotations

import torch


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """beta_1..beta_T linearly spaced (DDPM section 4; SPEC section 1), float64 (T,)."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), float64 (T,)."""
    return torch.cumprod(1.0 - betas, dim=0)


def spaced_timesteps(T: int, steps: int) -> torch.Tensor:
    """``steps`` timesteps from T-1 down to 0, evenly spaced (descending, int64)."""
    if not 1 <= steps <= T:
        raise ValueError(f"sampling steps must be in [1, {T}], got {steps}")
    return torch.linspace(T - 1, 0, steps).round().long()


def gather(a: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """a[t] as float32 on like's device, shaped to broadcast against ``like`` (B, ...)."""
    out = a.to(like.device)[t.long()].float()
    return out.view(-1, *([1] * (like.dim() - 1)))
