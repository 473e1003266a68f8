"""Diffusion core: schedules, losses, prediction conversions and samplers (pure functions / small callables).

One sampler contract (``samplers``): ``sampler(model, x, sigmas, *, callback=None, clip_x0=False,
generator=None, progress=False, **options)`` with ``model(x, sigma) -> D`` (k-diffusion's form). A
``Parameterization`` (``param``) adapts any eps / v / D / flow-velocity network to it once;
``sample(param, model, noise, steps, sampler=NAME)`` runs any sampler on any objective.
"""
from .ddpm import EpsilonLoss, predict_x0, q_sample, renoise_coeffs
from .edm import (EDM_PRESETS, EDMConfig, EDMLoss, EDMPrecond, edm_loss_weight, edm_precond_coeffs,
                  edm_renoise_coeffs, karras_sigmas, x0_eps_from_denoised)
from .flow import SIGMA_MIN, FlowMatchingLoss, flow_path, flow_times, x0_eps_from_velocity
from .flow import renoise_coeffs as flow_renoise_coeffs
from .objectives import OBJECTIVES, Objective, TimeScale, build_network, make_objective, run_sampler
from .param import (Denoiser, Parameterization, edm_param, eps_param, flow_param,
                    parameterization_for, v_param)
from .samplers import SAMPLERS, ddim, ddpm, dopri5, euler, get_sampler, heun, sample
from .schedules import alphas_cumprod, linear_betas, spaced_timesteps

__all__ = [
    "EpsilonLoss", "predict_x0", "q_sample", "renoise_coeffs",
    "alphas_cumprod", "linear_betas", "spaced_timesteps",
    "EDM_PRESETS", "EDMConfig", "EDMLoss", "EDMPrecond", "edm_loss_weight", "edm_precond_coeffs",
    "edm_renoise_coeffs", "karras_sigmas", "x0_eps_from_denoised",
    "SIGMA_MIN", "FlowMatchingLoss", "flow_path", "flow_times",
    "x0_eps_from_velocity", "flow_renoise_coeffs",
    "OBJECTIVES", "Objective", "TimeScale", "build_network", "make_objective", "run_sampler",
    "Denoiser", "Parameterization", "edm_param", "eps_param", "flow_param", "parameterization_for",
    "v_param", "SAMPLERS", "ddim", "ddpm", "dopri5", "euler", "get_sampler", "heun", "sample",
]
