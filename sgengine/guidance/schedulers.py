"""A diffusers scheduler as the engine's ``Parameterization``, so SAG (and the engine's samplers)
run a diffusers model exactly as its pipeline does.

``scheduler_param(scheduler, image_seq_len=None, sigmas=None)``:

* discrete alpha-bar schedulers (DDPM, DDIM, PNDM, Euler, DPM-Solver with ``prediction_type``
  'epsilon' or 'v_prediction'): ``eps_param`` / ``v_param`` on the scheduler's ``alphas_cumprod``;
  the native time is the scheduler's timestep index;
* flow matching as diffusers runs it (``FlowMatchEulerDiscreteScheduler``: SD3, Flux, Sana; and
  DPM-Solver with ``prediction_type='flow_prediction'``, Sana's): with s the scheduler's sigma in
  [0, 1] and N = ``num_train_timesteps``,

      x_t = (1 - s) x0 + s eps,    v = eps - x0,    native time t = s N (the scheduler's timesteps)
      x0 = x_t - s v,              eps = x_t + (1 - s) v                                  (1)

  so SAG degrades x0 and re-noises as (1 - s) x0_deg + s eps. In the samplers' variance-exploding
  form sigma = s / (1 - s) and x_t = x / (1 + sigma). d v / d x_t at fixed eps is -1 / (1 - s)
  (from (1)); SAG's correction term uses it (``sgengine.guidance.sag``).

  ``grid(steps)`` is the scheduler's own: a copy runs ``set_timesteps(steps, sigmas=..., mu=...)``
  with the static ``shift`` of its config, and with dynamic shifting mu = ``flow_shift_mu`` of the
  image's token count, as Flux computes it (linear in the sequence length between
  (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)). ``sigmas`` is the unshifted
  grid a pipeline hands the scheduler, as a function of ``steps`` (Flux: ``flux_sigmas``); None
  leaves the scheduler's default (SD3's).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch

from ..diffusion.param import Parameterization, eps_param, v_param

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


def flow_shift_mu(scheduler, image_seq_len: int) -> float:
    """mu of dynamic shifting for ``image_seq_len`` image tokens (diffusers' ``calculate_shift``)."""
    c = scheduler.config
    lo_n, hi_n = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
    lo, hi = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
    m = (hi - lo) / (hi_n - lo_n)
    return image_seq_len * m + (lo - m * lo_n)


def flux_sigmas(steps: int) -> np.ndarray:
    """The unshifted grid FluxPipeline hands its scheduler: linspace(1, 1/steps, steps)."""
    return np.linspace(1.0, 1 / steps, steps)


def is_flow(scheduler) -> bool:
    """Does ``scheduler`` run flow matching (velocity v = eps - x0 on x_t = (1 - s) x0 + s eps)?"""
    return (type(scheduler).__name__ in FLOW_SCHEDULERS
            or scheduler.config.get("prediction_type", None) == "flow_prediction")


def scheduler_param(scheduler, image_seq_len: int | None = None, sigmas=None) -> Parameterization:
    """The ``Parameterization`` of a diffusers scheduler (see the module docstring)."""
    if is_flow(scheduler):
        return _flow(scheduler, image_seq_len, sigmas)
    kind = scheduler.config.get("prediction_type", "epsilon")
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None or kind not in ("epsilon", "v_prediction"):
        raise TypeError(f"{type(scheduler).__name__} (prediction_type {kind!r}) is not supported: use a flow-matching "
                        "scheduler or an alpha-bar one (DDPM / DDIM / PNDM / Euler / DPM-Solver) with epsilon or v_prediction")
    return (v_param if kind == "v_prediction" else eps_param)(torch.as_tensor(abar))


def _flow_grid(scheduler, image_seq_len, sigmas):
    dynamic = bool(scheduler.config.get("use_dynamic_shifting", False))

    def grid(steps: int) -> torch.Tensor:  # (SAG's steps never ask for it: the error comes only here)
        if dynamic and image_seq_len is None:
            raise ValueError(f"{type(scheduler).__name__} shifts dynamically: pass image_seq_len (the image's token "
                             "count, e.g. (H/2)(W/2) for a Flux latent of H x W)")
        sched = copy.deepcopy(scheduler)
        kw = {"mu": flow_shift_mu(scheduler, image_seq_len)} if dynamic else {}
        if sigmas is not None:
            kw["sigmas"] = sigmas(steps)
        sched.set_timesteps(None if "sigmas" in kw else steps, **kw)
        s = torch.as_tensor(sched.sigmas, dtype=torch.float64)
        return torch.where(s < 1, s / (1 - s).clamp(min=1e-300), torch.full_like(s, math.inf))  # s = 1: pure noise
    return grid


def _flow(scheduler, image_seq_len, sigmas) -> Parameterization:
    N = float(scheduler.config.num_train_timesteps)

    def coeffs(t):
        s = torch.as_tensor(t).double() / N
        return 1 - s, s

    def time(sigma):  # sigma = s / (1 - s)  ->  t = s N; inf -> N
        sig = sigma.double()
        return torch.where(torch.isinf(sig), torch.full_like(sig, N), N * sig / (1 + sig))

    def gain(t, a, b):  # d v / d x_t at fixed eps = -1 / (1 - s); at s = 1 the degraded input equals x_t
        return torch.where(a > 0, -1.0 / a.clamp(min=1e-12), torch.zeros_like(a))
    return Parameterization(
        "flow", coeffs, time, lambda sig: (1 / (1 + sig.double())).float(),
        lambda x, v, a, b, t: (x - b * v, x + a * v), lambda x0, eps, a, b, t: eps - x0,
        gain, _flow_grid(scheduler, image_seq_len, sigmas))
