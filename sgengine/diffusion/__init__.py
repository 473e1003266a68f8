"""Diffusion core: schedules and samplers are pure functions; losses are small callables.

Samplers share one signature ``sampler(denoise, x, ts_or_sigmas, *, generator=None, progress=False, ...)``.
"""
from .ddpm import EpsilonLoss, predict_x0, q_sample, renoise_coeffs
from .edm import (EDM_PRESETS, EDMConfig, EDMLoss, EDMPrecond, edm_loss_weight, edm_precond_coeffs,
                  edm_renoise_coeffs, euler_sample, heun_sample, karras_sigmas, x0_eps_from_denoised)
from .flow import (SIGMA_MIN, FlowMatchingLoss, dopri5_flow, euler_flow, flow_path, flow_times, heun_flow,
                   x0_eps_from_velocity)
from .flow import renoise_coeffs as flow_renoise_coeffs
from .samplers import ddim_sample, ddpm_sample
from .schedules import alphas_cumprod, linear_betas, spaced_timesteps

__all__ = [
    "EpsilonLoss", "predict_x0", "q_sample", "renoise_coeffs", "ddim_sample", "ddpm_sample",
    "alphas_cumprod", "linear_betas", "spaced_timesteps",
    "EDM_PRESETS", "EDMConfig", "EDMLoss", "EDMPrecond", "edm_loss_weight", "edm_precond_coeffs",
    "edm_renoise_coeffs", "euler_sample", "heun_sample", "karras_sigmas", "x0_eps_from_denoised",
    "SIGMA_MIN", "FlowMatchingLoss", "dopri5_flow", "euler_flow", "flow_path", "flow_times", "heun_flow",
    "x0_eps_from_velocity", "flow_renoise_coeffs",
]
