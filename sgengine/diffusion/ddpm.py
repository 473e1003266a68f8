"""DDPM with epsilon prediction: forward process, x0 from eps, and the training loss."""
from __future__ import annotations

import torch

from .schedules import alphas_cumprod, gather, linear_betas


def q_sample(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (DDPM eq. 4)."""
    a = gather(abar, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)  (DDIM eq. 9)."""
    a = gather(abar, t, x_t)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def renoise_coeffs(t: torch.Tensor, abar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of the forward process x_t = a x0 + b eps, each (B,) float32 (for SAG)."""
    a = abar.to(t.device)[t.long()].float()
    return a.sqrt(), (1 - a).sqrt()


class EpsilonLoss:
    """L_simple = || eps - eps_theta(x_t, t, cond) ||^2 per sample (DDPM eq. 14)."""

    def __init__(self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.T = T
        self.abar = alphas_cumprod(linear_betas(T, beta_start, beta_end))

    def __call__(self, net, x0: torch.Tensor, generator: torch.Generator | None = None, **cond) -> torch.Tensor:
        b = x0.shape[0]
        t = torch.randint(0, self.T, (b,), device=x0.device, generator=generator)
        eps = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        pred = net(q_sample(x0, t, eps, self.abar), t.float(), **cond)
        return (pred.float() - eps.float()).pow(2).flatten(1).mean(1)
