"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

Everything here is in the paper's notation: x = y + n with n ~ N(0, sigma^2 I) (eq. 2 with
s(t) = 1, sigma(t) = t), the denoiser D(x; sigma) and its raw network F_theta (Table 1).

- ``EDMPrecond``: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (Table 1, eq. 7).
- ``EDMLoss``: lambda(sigma) ||D(y + n; sigma) - y||^2 with ln sigma ~ N(P_mean, P_std^2) (eqs. 2, 8).
- ``karras_sigmas``: the time steps of eq. 5 with a trailing sigma_N = 0.

Algorithm 2 (Heun, 2N - 1 evaluations) and its first-order variant, with the optional stochastic
churn, are ``heun`` and ``euler`` of ``sgengine.diffusion.samplers``, whose contract (D(x; sigma) on a
sigma grid, x the state at sigmas[0], i.e. sigma_max * randn, Algorithm 2 line 1) is EDM's own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (B,) tensor shaped (B, 1, ..., 1) to broadcast against x (B, ...)."""
    return v.view(-1, *([1] * (x.dim() - 1)))


def _sigma_batch(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma as a (B,) float32 tensor on x's device; a scalar is shared by the whole batch."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.dim() == 0:
        return sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or a (B,) tensor with B={x.shape[0]}, "
                         f"got shape {tuple(sigma.shape)}")
    return sigma


def edm_precond_coeffs(sigma: torch.Tensor, sigma_data: float = 0.5):
    """(c_skip, c_out, c_in, c_noise) of EDM Table 1, each shaped like sigma.

    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4.
    """
    var = sigma**2 + sigma_data**2
    return sigma_data**2 / var, sigma * sigma_data / var.sqrt(), var.rsqrt(), sigma.log() / 4


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2 (Table 1), so that the
    effective target of F_theta has unit weight at every noise level (eq. 8)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class EDMPrecond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise, **cond) (EDM eq. 7, Table 1).

    ``net(x, t, y=None, layout=None, null=None)`` is the engine's network; it receives
    t = c_noise = ln(sigma) / 4. ``forward(x, sigma, **cond)`` accepts sigma as a scalar or a (B,)
    tensor with sigma > 0 (not checked: a check would synchronise the device every call).
    The skip path is computed in float32 like the reference code, whatever the net's autocast.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0 (0.5 for images in [-1, 1]), got {sigma_data}")
        self.net, self.sigma_data = net, float(sigma_data)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        x = x.float()
        sigma = _sigma_batch(sigma, x)
        c_skip, c_out, c_in, c_noise = (_bcast(c, x) for c in edm_precond_coeffs(sigma, self.sigma_data))
        F_x = self.net(c_in * x, c_noise.flatten(), **cond)
        return c_skip * x + c_out * F_x.float()

    def attention_network(self) -> nn.Module:
        """The module whose attention layers SAG reads (the guidance layer-discovery protocol)."""
        return self.net


@dataclass(frozen=True)
class EDMLoss:
    """Per-sample EDM training loss (B,) (EDM eq. 2 weighted by lambda, Table 1 "Training").

    ln sigma ~ N(P_mean, P_std^2), n ~ N(0, sigma^2 I), loss = lambda(sigma) mean ||D(y + n; sigma) - y||^2 (y: the clean image).
    The squared error is averaged over pixels (the reference code sums); with Adam this only
    rescales the gradient, and it keeps the loss on the scale of the engine's other losses.
    """
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5

    def __post_init__(self):
        if self.P_std <= 0 or self.sigma_data <= 0:
            raise ValueError(f"P_std and sigma_data must be > 0, got {self.P_std}, {self.sigma_data}")

    def __call__(self, denoiser, x: torch.Tensor, generator: torch.Generator | None = None, **cond) -> torch.Tensor:
        # The clean image is EDM's y; it is x here because y is the engine's condition keyword.
        b = x.shape[0]
        rnd = torch.randn((b,), device=x.device, generator=generator)
        sigma = (rnd * self.P_std + self.P_mean).exp()
        n = torch.randn(x.shape, device=x.device, generator=generator) * _bcast(sigma, x)
        D = denoiser(x.float() + n, sigma, **cond)
        err = (D.float() - x.float()).pow(2).flatten(1).mean(1)
        return edm_loss_weight(sigma, self.sigma_data) * err


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM eq. 5: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    for i < N, and sigma_N = 0. float64 (n + 1,), descending; n = 1 gives [sigma_max, 0]."""
    if n < 1:
        raise ValueError(f"the number of sampling steps n must be >= 1, got {n}")
    if not 0 < sigma_min <= sigma_max or rho <= 0:
        raise ValueError(f"need 0 < sigma_min <= sigma_max and rho > 0, got {sigma_min}, {sigma_max}, {rho}")
    ramp = torch.linspace(sigma_max ** (1 / rho), sigma_min ** (1 / rho), n, dtype=torch.float64)
    return torch.cat([ramp**rho, ramp.new_zeros(1)])


def edm_renoise_coeffs(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of the EDM forward process x = a x0 + b eps, i.e. (1, sigma) as (B,) float32 (for SAG)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    return torch.ones_like(sigma), sigma


def x0_eps_from_denoised(x: torch.Tensor, D: torch.Tensor, sigma: torch.Tensor):
    """(x0_hat, eps_hat) from D(x; sigma): x0_hat = D and eps_hat = (x - D) / sigma, since x = x0 + sigma eps."""
    sigma = _sigma_batch(sigma, x).to(x.dtype)
    return D, (x - D) / _bcast(sigma, x)


@dataclass(frozen=True)
class EDMConfig:
    """EDM hyperparameters (Table 1 "Sampling" and "Training" columns; C-EDM follows EDM's defaults)."""
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    steps: int = 18  # N; Heun uses 2N - 1 = 35 evaluations at 32x32
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5
    S_churn: float = 0.0  # deterministic sampling for CIFAR-10 (EDM Table 5)
    S_min: float = 0.0
    S_max: float = float("inf")
    S_noise: float = 1.0

    def __post_init__(self):
        self.sigmas(), self.loss()  # their constructors validate the schedule and the loss parameters

    def sigmas(self) -> torch.Tensor:
        return karras_sigmas(self.steps, self.sigma_min, self.sigma_max, self.rho)

    def loss(self) -> EDMLoss:
        return EDMLoss(self.P_mean, self.P_std, self.sigma_data)

    def churn(self) -> dict:
        """The sampler options S_churn, S_min, S_max, S_noise."""
        return {"S_churn": self.S_churn, "S_min": self.S_min, "S_max": self.S_max, "S_noise": self.S_noise}


EDM_PRESETS: dict[str, EDMConfig] = {
    "cifar-cedm": EDMConfig(),  # C-EDM on CIFAR-10/100 32x32 (SPEC section 3; EDM's VP/DDPM++ CIFAR setup)
}
