"""What a network's native prediction means, per training objective, for guidance that re-noises.

Self-attention guidance (Hong et al., Eq. 16-18) recovers x0_hat and eps_hat from the model's
prediction, blurs x0_hat and diffuses it again with eps_hat. Public pipelines hard-code the DDPM
relation x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, which is wrong for sigma (EDM, x = x0 + sigma
eps) and velocity (flow matching, x_t = t x0 + (1 - (1 - s) t) eps) models. A ``Parameterization``
bundles, for one objective, the existing recovery and re-noising functions of
``sgengine.diffusion`` (none is re-implemented here):

* ``x0_eps(x_t, pred, t) -> (x0, eps)`` with x_t = a x0 + b eps exactly;
* ``coeffs(t) -> (a, b)``, each (B,) float32;
* ``input_gain(t)`` = d pred / d x_t at fixed eps_hat, (B,): 0 for eps (DDPM), 1 for D (EDM),
  1/t for v (flow). SAG's Eq. 17 is defined on eps; two predictions made at *different* inputs
  (x_t and the degraded x_deg) therefore combine natively only after a correction by this gain
  (see ``sgengine.guidance.sag``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..diffusion import ddpm, edm, flow
from ..diffusion.schedules import alphas_cumprod, linear_betas


@dataclass(frozen=True)
class Parameterization:
    name: str  # 'eps' (DDPM), 'edm' (D(x; sigma)) or 'velocity' (flow matching)
    _x0_eps: Callable  # (x_t, pred, t) -> (x0, eps)
    _coeffs: Callable  # t -> (a, b)
    _gain: Callable  # t (B,) float32 -> d pred / d x_t at fixed eps, (B,)

    def x0_eps(self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor):
        """(x0_hat, eps_hat) from the native prediction at x_t and time t (B,)."""
        return self._x0_eps(x_t, pred, t)

    def coeffs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b), each (B,) float32 on t's device, with x_t = a x0 + b eps."""
        a, b = self._coeffs(t)
        return a.float().to(t.device), b.float().to(t.device)

    def input_gain(self, t: torch.Tensor) -> torch.Tensor:
        """d pred / d x_t holding eps fixed, (B,) float32; 0 where a = 0 (there x_t = eps)."""
        return self._gain(torch.as_tensor(t, dtype=torch.float32)).to(t.device)


def ddpm_param(abar: torch.Tensor) -> Parameterization:
    """eps prediction on the alpha-bar schedule ``abar`` (t: timestep indices, as floats)."""
    return Parameterization("eps", lambda x, eps, t: (ddpm.predict_x0(x, eps, t, abar), eps),
                            lambda t: ddpm.renoise_coeffs(t, abar), torch.zeros_like)


def edm_param() -> Parameterization:
    """D(x; sigma) (EDM, Karras et al. 2022 eq. 2): x = x0 + sigma eps, t = sigma."""
    return Parameterization("edm", edm.x0_eps_from_denoised, edm.edm_renoise_coeffs, torch.ones_like)


def _velocity_gain(t: torch.Tensor) -> torch.Tensor:
    # v = (x_t - eps) / t at fixed eps; at t = 0 the degraded input equals x_t, so 0 is exact.
    return torch.where(t > 0, 1.0 / t.clamp(min=1e-12), torch.zeros_like(t))


def flow_param(sigma_min: float = flow.SIGMA_MIN) -> Parameterization:
    """Velocity on the constant-velocity path x_t = t x0 + (1 - (1 - s) t) eps (t = 1: data)."""
    return Parameterization("velocity", lambda x, v, t: flow.x0_eps_from_velocity(x, v, t, sigma_min),
                            lambda t: flow.renoise_coeffs(t, sigma_min), _velocity_gain)


def parameterization_for(objective: str, cfg=None) -> Parameterization:
    """The Parameterization of ``objective`` ('ddpm', 'edm', 'flow'); ddpm reads cfg.T / beta_*."""
    if objective == "ddpm":
        if cfg is None:
            raise ValueError("objective 'ddpm' needs the training config (T, beta_start, beta_end): "
                             "parameterization_for('ddpm', cfg)")
        return ddpm_param(alphas_cumprod(linear_betas(cfg.T, cfg.beta_start, cfg.beta_end)))
    if objective == "edm":
        return edm_param()
    if objective == "flow":
        return flow_param()
    raise ValueError(f"objective must be 'ddpm', 'edm' or 'flow', got {objective!r}")
