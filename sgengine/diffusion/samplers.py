"""DDIM and DDPM ancestral samplers as pure functions with the shared signature.

``sampler(denoise, x, ts, *, alphas_cumprod, generator=None, progress=False, ...) -> x0``
where ``denoise(x, t) -> eps`` and ``ts`` are descending timesteps. Guidance (CFG, SAG)
lives in the ``denoise`` callable; samplers never special-case it.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .ddpm import predict_x0
from .schedules import gather


def _steps(ts: torch.Tensor, progress: bool):
    """(t, t_prev) pairs; t_prev = -1 marks the final step to x0."""
    ts = ts.long().tolist()
    pairs = list(zip(ts, ts[1:] + [-1]))
    return tqdm(pairs, desc="sampling", disable=not progress, leave=False)


def _x0(denoise, x, t: int, abar, clip_x0: bool):
    tb = torch.full((x.shape[0],), float(t), device=x.device)
    eps = denoise(x, tb).float()
    x0 = predict_x0(x, eps, tb, abar)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = (x - gather(abar, tb, x).sqrt() * x0) / (1 - gather(abar, tb, x)).sqrt()
    return x0, eps


def _abar_at(abar: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(1.0 if t < 0 else float(abar[t]), device=x.device)


@torch.no_grad()
def ddim_sample(denoise, x, ts, *, alphas_cumprod, eta: float = 0.0, clip_x0: bool = True,
                generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12); eta=0 is deterministic, eta=1 is DDPM-like."""
    x = x.float()
    for t, t_prev in _steps(ts, progress):
        x0, eps = _x0(denoise, x, t, alphas_cumprod, clip_x0)
        a, a_prev = _abar_at(alphas_cumprod, t, x), _abar_at(alphas_cumprod, t_prev, x)
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()  # eq. 16
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and t_prev >= 0:
            x = x + sigma * torch.randn(x.shape, device=x.device, generator=generator)
    return x


@torch.no_grad()
def ddpm_sample(denoise, x, ts, *, alphas_cumprod, clip_x0: bool = True,
                generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """Ancestral sampling from the posterior q(x_prev | x_t, x0_hat) (DDPM eqs. 6-7) on ``ts``."""
    x = x.float()
    for t, t_prev in _steps(ts, progress):
        x0, _ = _x0(denoise, x, t, alphas_cumprod, clip_x0)
        a, a_prev = _abar_at(alphas_cumprod, t, x), _abar_at(alphas_cumprod, t_prev, x)
        beta = 1 - a / a_prev  # the respaced beta between t_prev and t
        mean = (a_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - a_prev) * x) / (1 - a)
        var = beta * (1 - a_prev) / (1 - a)  # beta_tilde, eq. 7
        x = mean + var.sqrt() * torch.randn(x.shape, device=x.device, generator=generator) if t_prev >= 0 else mean
    return x
