"""Flow matching on the constant-velocity path (SPEC section 2; online self-guidance paper eq. 8).

Time runs from noise to data: t in [0, 1], t = 0 is pure noise eps, t = 1 is data x. With
sigma_min = s (Lipman et al. 2023, the OT path with a small data-end noise floor):

    x_t = t x + (1 - (1 - s) t) eps,          u = dx_t/dt = x - (1 - s) eps,

and the network regresses u (the paper's eq. 9/15, || x_1 - x_0 - v ||^2 at s = 0). Sampling
integrates dx/dt = v(x, t) from t = 0 (noise) to t = 1 through the one sampler contract:
``sample(flow_param(), net, noise, steps, sampler=...)`` (``sgengine.diffusion.samplers``; its ODE
samplers step in t on this objective, on the grid ``flow_times``); guidance (CFG, SAG) wraps ``net``.
"""
from __future__ import annotations

import torch

SIGMA_MIN = 1e-4


def _float(t) -> torch.Tensor:
    """Times as a float tensor: float32 unless already floating (float64 stays exact)."""
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.float()


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) or scalar times as (B, 1, ..., 1) on x's device for broadcasting against x."""
    t = _float(t).to(x.device)
    return t.reshape(-1, *([1] * (x.dim() - 1))) if t.dim() else t


def renoise_coeffs(t: torch.Tensor, sigma_min: float = SIGMA_MIN) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with x_t = a x0 + b eps on this path: a = t, b = 1 - (1 - s) t; (B,) float32 each
    (float64 for float64 times)."""
    t = _float(t)
    return t, 1 - (1 - sigma_min) * t


def flow_path(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
              sigma_min: float = SIGMA_MIN) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, u): the point at time t (B,) between noise eps and data x, and its velocity target."""
    a, b = renoise_coeffs(_bcast(t, x), sigma_min)
    return a * x + b * eps, x - (1 - sigma_min) * eps


def x0_eps_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor,
                         sigma_min: float = SIGMA_MIN) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) such that flow_path(x0, eps, t) = (x_t, v); exact for every t in [0, 1].

    Solving x_t = t x0 + (1 - (1-s) t) eps and v = x0 - (1-s) eps: the (1-s) t eps terms cancel,
    eps = x_t - t v and x0 = v + (1-s) eps (Algorithm 2's estimate z + (1-t) v at s = 0).
    """
    t = _bcast(t, x_t)
    eps = x_t - t * v
    return v + (1 - sigma_min) * eps, eps


class FlowMatchingLoss:
    """Per-sample MSE || v_theta(x_t, t, cond) - u ||^2 averaged over pixels, t ~ U(0, 1)."""

    def __init__(self, sigma_min: float = SIGMA_MIN):
        self.sigma_min = float(sigma_min)

    def draw(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """(t (B,), eps like x): the time and noise of one training draw."""
        t = torch.rand(x.shape[0], device=x.device, generator=generator)
        return t, torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)

    def __call__(self, net, x: torch.Tensor, generator: torch.Generator | None = None,
                 t: torch.Tensor | None = None, **cond) -> torch.Tensor:
        """(B,) loss; ``t`` fixes the times (else U(0, 1)); ``cond`` goes to ``net`` as keywords."""
        t_draw, eps = self.draw(x, generator)
        t = t_draw if t is None else t.to(x.device, torch.float32)
        x_t, u = flow_path(x, eps, t, self.sigma_min)
        pred = net(x_t.to(x.dtype), t, **cond)
        return (pred.float() - u.float()).pow(2).flatten(1).mean(1)


def flow_times(steps: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``steps + 1`` ascending times linspace(0, 1): the grid of ``steps`` solver steps."""
    if steps < 1:
        raise ValueError(f"flow_times needs at least one step, got {steps}")
    return torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=dtype)
