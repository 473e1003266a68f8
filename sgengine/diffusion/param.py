"""What a network's native prediction means, and how it becomes the one sampler contract.

Every objective writes its noisy input as x_t = a(t) x0 + b(t) eps. The samplers of
``sgengine.diffusion.samplers`` all take ONE form (k-diffusion's; Karras et al. 2022 eq. 2 with
s(t) = 1): a denoiser D(x, sigma) ~ E[x0 | x] on the variance-exploding state x = x0 + sigma eps,
with sigma = b / a, on a descending sigma grid. A ``Parameterization`` holds, for one objective,
the conversions between the two:

* ``x0_eps(x_t, pred, t) -> (x0, eps)`` and its inverse ``prediction(x0, eps, t)``;
* ``coeffs(t) -> (a, b)``, each (B,) in t's floating dtype (float32 for integer t); ``sigma(t) = b / a``;
  ``time(sigma)`` its inverse; ``scale(sigma) = a`` (x_t = scale * x);
* ``input_gain(t)`` = d pred / d x_t at fixed eps (0 for eps, 1 for D, 1/t for flow velocity,
  1/a for v): SAG's Eq. 17 is defined on eps (see ``sgengine.guidance.sag``);
* ``grid(steps)``: the objective's own sigma grid (flow matching's starts at sigma = inf, its t = 0), and
  ``prior_scale(sigma0)``: the std of the starting state (sqrt(1 + sigma^2) for variance-preserving
  schedules, whose x_T ~ N(0, I); sigma else);
* ``denoiser(model)``: the ONE adapter from a native ``model(x_t, t, **cond)`` (guidance included)
  to D(x, sigma, **cond);
* ``rates(t) -> (da/dt, db/dt)`` where the objective names its own ODE time (``rates_fn``; flow
  matching's t): the ODE samplers then integrate the probability-flow ODE dx_t/dt = a' x0_hat +
  b' eps_hat (for flow matching the network's velocity itself) in that time on x_t instead of in
  sigma (``Denoiser.velocity``; ``samplers``). Flow's training paths are straight in t, and its
  t = 0 (sigma = inf) is a finite start there: sigma-space steps after a fixed Euler first step
  were 7x (Heun) to 9x (dopri5) less accurate on Gaussian data (tests/test_samplers.py).

Constructors: ``eps_param(abar)`` / ``v_param(abar)`` (eps- or v-prediction on a discrete
alpha-bar schedule, e.g. a diffusers scheduler's ``alphas_cumprod``; fractional timesteps are
interpolated linearly in alpha-bar), ``edm_param()`` (D networks), ``flow_param()`` (flow-matching
velocity), and ``parameterization_for(name)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import edm, flow
from .schedules import alphas_cumprod, linear_betas, spaced_timesteps

def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))


def _batch(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma as (B,) in x's precision (at least float32): float64 sampling converts in float64."""
    s = torch.as_tensor(sigma, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    return s.expand(x.shape[0]) if s.dim() == 0 else s


@dataclass(frozen=True)
class Parameterization:
    name: str  # 'eps', 'v', 'edm' (D) or 'velocity' (flow matching)
    coeffs_fn: Callable = field(repr=False)  # t -> (a, b)
    time_fn: Callable = field(repr=False)  # sigma -> t
    scale_fn: Callable = field(repr=False)  # sigma -> a
    to_x0_eps: Callable = field(repr=False)  # (x_t, pred, a, b, t) -> (x0, eps)
    to_pred: Callable = field(repr=False)  # (x0, eps, a, b, t) -> pred
    gain_fn: Callable = field(repr=False)  # (t, a, b) -> d pred / d x_t
    grid_fn: Callable = field(repr=False)  # steps -> descending float64 sigmas
    variance_preserving: bool = False
    rates_fn: Callable | None = field(default=None, repr=False)  # t -> (da/dt, db/dt): ODE in native time

    def coeffs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b), each (B,) on t's device in t's floating dtype (float32 for integer t), x_t = a x0 + b eps.
        float64 times keep float64 coefficients (float32 ones cost float64 sampling ~1e-5 at high noise)."""
        t = torch.as_tensor(t)
        dtype = t.dtype if t.is_floating_point() else torch.float32
        a, b = self.coeffs_fn(t)
        return a.to(t.device, dtype), b.to(t.device, dtype)

    @property
    def ode_in_time(self) -> bool:
        """Whether the ODE samplers integrate in this objective's own time t (``rates_fn`` set)."""
        return self.rates_fn is not None

    def rates(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(da/dt, db/dt) at native time t, like ``coeffs``; only where ``ode_in_time``."""
        if self.rates_fn is None:
            raise ValueError(f"the {self.name!r} parameterisation integrates in sigma: it names no ODE time")
        t = torch.as_tensor(t)
        dtype = t.dtype if t.is_floating_point() else torch.float32
        da, db = self.rates_fn(t)
        return da.to(t.device, dtype), db.to(t.device, dtype)

    def x0_eps(self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor):
        """(x0_hat, eps_hat) from the native prediction at x_t and time t (B,)."""
        a, b = self.coeffs(t)
        return self.to_x0_eps(x_t, pred, _col(a, x_t), _col(b, x_t), t)

    def prediction(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The native prediction a perfect network makes for (x0, eps) at time t (the inverse of x0_eps)."""
        a, b = self.coeffs(t)
        return self.to_pred(x0, eps, _col(a, x0), _col(b, x0), t)

    def input_gain(self, t: torch.Tensor) -> torch.Tensor:
        """d pred / d x_t holding eps fixed, (B,) in t's floating dtype (float32 for integer t)."""
        t = torch.as_tensor(t)
        t = t if t.is_floating_point() else t.float()
        a, b = self.coeffs(t)
        return self.gain_fn(t, a, b).to(t.device)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma = b / a at native time t (float64)."""
        a, b = self.coeffs_fn(torch.as_tensor(t, dtype=torch.float64))
        return b.double() / a.double()

    def time(self, sigma: torch.Tensor) -> torch.Tensor:
        """The native time of noise level sigma (the network's t input)."""
        return self.time_fn(torch.as_tensor(sigma))

    def scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """a at noise level sigma: x_t = scale(sigma) * x."""
        return self.scale_fn(torch.as_tensor(sigma))

    def grid(self, steps: int) -> torch.Tensor:
        """The objective's own descending sigma grid of ``steps`` steps (float64)."""
        return self.grid_fn(steps)

    def prior_scale(self, sigma0: float) -> float:
        """Std of the starting state at sigmas[0]: x = prior_scale * randn."""
        s = float(sigma0)
        return (1 + s * s) ** 0.5 if self.variance_preserving else s

    def denoiser(self, model) -> "Denoiser":
        """``model(x_t, t, **cond) -> native prediction`` as the samplers' D(x, sigma, **cond)."""
        return Denoiser(model, self)


class Denoiser:
    """D(x, sigma, **cond) = x0_hat from a native network: x_t = a x, t = time(sigma) (the one adapter).
    Where the parameterisation names its ODE time (``ode_in_time``), ``velocity`` gives the ODE samplers
    the probability-flow ODE in that time, defined at sigma = inf too (where a = 0)."""

    def __init__(self, model, param: Parameterization):
        self.model, self.param = model, param

    def __call__(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        sigma = _batch(sigma, x)
        t = self.param.time(sigma).to(torch.promote_types(x.dtype, torch.float32))
        a = self.param.scale(sigma).to(x.device)
        x_t = _col(a, x) * x
        pred = self.model(x_t, t, **cond)
        return self.param.x0_eps(x_t, pred.to(x.dtype), t)[0]

    @property
    def ode_in_time(self) -> bool:
        return self.param.ode_in_time

    def time(self, sigma: float) -> float:
        return float(self.param.time(torch.tensor(float(sigma), dtype=torch.float64)))

    def sigma(self, t: float) -> float:
        return float(self.param.sigma(torch.tensor(float(t), dtype=torch.float64)))

    def state_scale(self, sigma: float) -> float:
        """x_t / x at sigma: a, or b at sigma = inf, where the samplers' state x is the unit noise x / sigma."""
        a, b = self.param.coeffs(torch.tensor([self.time(sigma)], dtype=torch.float64))
        return float(b if sigma == float("inf") else a)

    def velocity(self, x_t: torch.Tensor, t: float, clip_x0: bool = False):
        """(dx_t/dt, x0_hat) at native time t: a' x0_hat + b' eps_hat (the probability-flow ODE in t; for flow
        matching the network's velocity itself). ``clip_x0`` clamps x0_hat to [-1, 1] and takes eps_hat from it."""
        tt = torch.full((x_t.shape[0],), float(t), device=x_t.device, dtype=x_t.dtype)
        x0, eps = self.param.x0_eps(x_t, self.model(x_t, tt).to(x_t.dtype), tt)
        if clip_x0:
            a, b = (_col(c, x_t) for c in self.param.coeffs(tt))
            x0 = x0.clamp(-1, 1)
            eps = (x_t - a * x0) / b
        da, db = (_col(c, x_t) for c in self.param.rates(tt))
        return da * x0 + db * eps, x0


# -- discrete alpha-bar schedules (DDPM): eps or v prediction ------------------------------------

class _Table:
    """An alpha-bar table kept once per device, so converting times never copies or syncs per step."""

    def __init__(self, abar: torch.Tensor):
        self.cpu, self.copies = abar.detach().double().cpu(), {}

    def on(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self.copies:
            self.copies[key] = self.cpu.to(device)
        return self.copies[key]


def _abar_fn(table: _Table) -> Callable:
    """alpha-bar at (fractional) timesteps, linear between the table's entries; exact at integers."""
    def at(t: torch.Tensor) -> torch.Tensor:
        tab = table.on(t.device)
        t = t.double().clamp(0, len(tab) - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=len(tab) - 1)
        return tab[lo] + (t - lo) * (tab[hi] - tab[lo])
    return at


def _vp_time(table: _Table) -> Callable:
    """Timestep of sigma on the schedule: alpha-bar = 1 / (1 + sigma^2), inverted piecewise linearly;
    within 1e-4 of an integer it is that integer (the grid's own levels round-trip exactly)."""
    def time(sigma: torch.Tensor) -> torch.Tensor:
        tab = table.on(sigma.device)
        target = 1 / (1 + sigma.double() ** 2)
        hi = torch.searchsorted(-tab, -target).clamp(1, len(tab) - 1)  # tab[hi] <= target
        lo = hi - 1
        t = lo + ((tab[lo] - target) / (tab[lo] - tab[hi])).clamp(0, 1)
        return torch.where((t - t.round()).abs() < 1e-4, t.round(), t)
    return time


def _vp(name, abar, to_x0_eps, to_pred, gain_fn) -> Parameterization:
    table = _Table(torch.as_tensor(abar))
    at, t_of = _abar_fn(table), _vp_time(table)

    def coeffs(t):
        a = at(torch.as_tensor(t))
        return a.sqrt(), (1 - a).sqrt()

    def grid(steps):
        ts = spaced_timesteps(len(abar), steps).double()
        a = at(ts)
        return torch.cat([((1 - a) / a).sqrt(), ts.new_zeros(1)])
    return Parameterization(name, coeffs, t_of, lambda s: (1 + s.double() ** 2).rsqrt().to(s.device),
                            to_x0_eps, to_pred, gain_fn, grid, variance_preserving=True)


def eps_param(abar: torch.Tensor) -> Parameterization:
    """eps prediction on the alpha-bar schedule ``abar`` (t: timestep indices as floats)."""
    return _vp("eps", abar, lambda x, eps, a, b, t: ((x - b * eps) / a, eps),
               lambda x0, eps, a, b, t: eps, lambda t, a, b: torch.zeros_like(t))


def v_param(abar: torch.Tensor) -> Parameterization:
    """v prediction (Salimans & Ho 2022): v = a eps - b x0, so x0 = a x_t - b v and eps = b x_t + a v."""
    return _vp("v", abar, lambda x, v, a, b, t: (a * x - b * v, b * x + a * v),
               lambda x0, eps, a, b, t: a * eps - b * x0, lambda t, a, b: -b / a)  # v = a eps - (b/a)(x_t - b eps)


# -- EDM (D networks) and flow matching (velocity) ----------------------------------------------

def edm_param(sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Parameterization:
    """D(x; sigma) (EDM, Karras et al. 2022 eq. 2): x = x0 + sigma eps, t = sigma; Karras grid (eq. 5)."""
    return Parameterization(
        "edm", edm.edm_renoise_coeffs, lambda s: s, lambda s: torch.ones_like(s, dtype=torch.float32),
        lambda x, D, a, b, t: (D, (x - D) / b), lambda x0, eps, a, b, t: x0,
        lambda t, a, b: torch.ones_like(t), lambda steps: edm.karras_sigmas(steps, sigma_min, sigma_max, rho))


def flow_param(sigma_min: float = flow.SIGMA_MIN) -> Parameterization:
    """Velocity on x_t = t x0 + (1 - (1 - s) t) eps (t = 1: data): sigma = 1/t - (1 - s), t = 1 / (sigma + 1 - s).
    The grid is uniform in t from 0 (sigma = inf: pure noise, see ``samplers.sample``) to 1 (sigma = s, x_t = x).
    The ODE samplers integrate in t (``rates_fn``): the training paths are straight in t, and t = 0 is a finite start."""
    s = sigma_min

    def time(sig):
        return 1 / (sig.double() + 1 - s)

    def grid(steps):
        ts = flow.flow_times(steps, dtype=torch.float64)
        return (1 - (1 - s) * ts) / ts  # inf at t = 0

    def gain(t, a, b):  # v = (x_t - eps) / t at fixed eps; at t = 0 the degraded input equals x_t
        return torch.where(t > 0, 1.0 / t.clamp(min=1e-12), torch.zeros_like(t))
    def rates(t):  # straight paths: a = t, b = 1 - (1 - s) t, so dx_t/dt = x0 - (1 - s) eps is the velocity
        return torch.ones_like(t), torch.full_like(t, -(1 - s))
    return Parameterization(
        "velocity", lambda t: flow.renoise_coeffs(t, s), time, lambda sig: time(sig),
        lambda x, v, a, b, t: flow.x0_eps_from_velocity(x, v, t, s), lambda x0, eps, a, b, t: x0 - (1 - s) * eps,
        gain, grid, rates_fn=rates)


def parameterization_for(objective: str, cfg=None) -> Parameterization:
    """The Parameterization of ``objective``: 'ddpm' / 'eps' (eps on linear betas), 'v' (v on the same),
    'edm' or 'flow'. The betas are DDPM's (T = 1000, 1e-4 .. 0.02) unless ``cfg`` (any object with
    ``T``, ``beta_start``, ``beta_end``, e.g. a TrainConfig) gives others."""
    if objective in ("ddpm", "eps", "v"):
        T, lo, hi = (1000, 1e-4, 0.02) if cfg is None else (cfg.T, cfg.beta_start, cfg.beta_end)
        abar = alphas_cumprod(linear_betas(T, lo, hi))
        return v_param(abar) if objective == "v" else eps_param(abar)
    if objective == "edm":
        return edm_param()
    if objective in ("flow", "velocity"):
        return flow_param()
    raise ValueError(f"objective must be 'ddpm', 'v', 'edm' or 'flow', got {objective!r}")
