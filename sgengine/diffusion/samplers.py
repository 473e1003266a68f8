"""The one sampler contract (k-diffusion's; Karras et al. 2022, EDM eq. 2 with s(t) = 1, sigma(t) = t).

    sampler(model, x, sigmas, *, callback=None, clip_x0=False, generator=None, progress=False, **options)

* ``model(x, sigma) -> D``: the denoised estimate E[x0 | x] of the state x = x0 + sigma eps, sigma
  a (B,) tensor. Every objective's network becomes this form ONCE, through
  ``Parameterization.denoiser`` (sgengine.diffusion.param); guidance (CFG, SAG) wraps the native
  network inside it, so samplers never special-case an objective or a guidance.
* ``x``: the state at sigmas[0]; ``sigmas``: descending noise levels, > 0 except an optional final 0.
  The result is the state at sigmas[-1] (the sample itself when the grid ends in 0).
* ``callback(info)`` after each step with info = {i, x, sigma, sigma_next, denoised}; returning
  True stops early, and the sampler returns the last ``denoised`` (x0 estimate).
* ``clip_x0``: clamp D to [-1, 1] (DDIM's x0 clipping) before each step.
* The ODE samplers (``euler``, ``heun``, ``dopri5``) integrate in sigma, except on a model that integrates
  in its objective's own time (``Denoiser.ode_in_time``, flow matching's t; ``param.rates``): there they
  step in that time on x_t (the grid's sigmas mapped to times), where flow's training paths are straight,
  and sigmas[0] may be inf (t = 0, pure noise; x is then the unit noise x / sigma).

Samplers: ``euler`` / ``heun`` (EDM Algorithm 2, optional churn; equal to k-diffusion's), ``ddim``
(Song et al. 2021 eq. 12 on the sigma grid; eta = 0 is the Euler step of the probability-flow ODE),
``ddpm`` (ancestral: ddim with eta = 1, the DDPM posterior of eqs. 6-7), ``dopri5`` (adaptive
Dormand-Prince through torchdiffeq, in log sigma). ``SAMPLERS`` maps the names to them.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


class _Stop(Exception):
    """Raised inside a sampler when the callback asks to stop; carries the last denoised estimate."""

    def __init__(self, denoised):
        self.denoised = denoised


def _levels(sigmas, inf_start: bool = False) -> list[float]:
    """The noise levels as Python floats (one host transfer), checked once before sampling; ``inf_start``
    allows sigmas[0] = inf (a model integrating in its own time starts there)."""
    s = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    finite = s[1:] if inf_start and len(s) and math.isinf(s[0]) and s[0] > 0 else s
    if s.dim() != 1 or len(s) < 2 or not torch.isfinite(finite).all():
        raise ValueError(f"sigmas must be a finite 1-D sequence of >= 2 levels (see karras_sigmas), got {s}")
    bad = (s[:-1] <= 0) | (s[1:] > s[:-1])
    if bad.any() or s[-1] < 0:
        i = int(bad.nonzero()[0]) if bad.any() else len(s) - 1
        raise ValueError(f"sigmas must be non-increasing and > 0 except a final 0; got {s[i:i + 2].tolist()} "
                         f"at index {i} of {len(s)}")
    return s.tolist()


class _Run:
    """One sampling run: the denoiser with clipping, the callback and the progress bar. ``ode``: an ODE
    sampler, which integrates in the model's own time where it names one (``Denoiser.ode_in_time``)."""

    def __init__(self, model, x, sigmas, callback, clip_x0, progress, ode: bool = False):
        self.model, self.callback, self.clip = model, callback, clip_x0
        self.in_time = ode and getattr(model, "ode_in_time", False)
        self.levels = _levels(sigmas, inf_start=self.in_time)
        self.x = x.to(torch.promote_types(x.dtype, torch.float32))  # half inputs integrate in float32
        self.pairs = list(zip(self.levels[:-1], self.levels[1:]))
        self.bar = tqdm(self.pairs, desc="sampling", disable=not progress, leave=False)

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        D = self.model(x, torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype)).to(x.dtype)
        return D.clamp(-1, 1) if self.clip else D

    def time_step(self, x: torch.Tensor, sigma: float, sigma_next: float, second_order: bool):
        """Euler's / Heun's step in the model's own time t on x_t = a x (dx_t/dt = ``velocity``); (x', x0_hat)."""
        m = self.model
        t, t_next = m.time(sigma), m.time(sigma_next)
        y = x * m.state_scale(sigma)
        v, D = m.velocity(y, t, self.clip)
        y_next = y + (t_next - t) * v
        if second_order:
            y_next = y + (t_next - t) * 0.5 * (v + m.velocity(y_next, t_next, self.clip)[0])
        return y_next / m.state_scale(sigma_next), D

    def report(self, i: int, x, sigma: float, sigma_next: float, denoised) -> None:
        if self.callback is not None and self.callback(
                {"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised}):
            raise _Stop(denoised)

    def loop(self, step) -> torch.Tensor:
        """x <- step(x, i, sigma, sigma_next) over the grid; (x, denoised) from each step."""
        x = self.x
        try:
            for i, (sigma, sigma_next) in enumerate(self.bar):
                x, denoised = step(x, i, sigma, sigma_next)
                self.report(i, x, sigma, sigma_next, denoised)
        except _Stop as stop:
            return stop.denoised
        return x


def _gamma(sigma: float, n: int, S_churn: float, S_min: float, S_max: float) -> float:
    """Algorithm 2 line 4: gamma_i = min(S_churn / N, sqrt(2) - 1) if sigma_i in [S_min, S_max]."""
    return min(S_churn / n, math.sqrt(2) - 1) if S_min <= sigma <= S_max else 0.0


def _churn(x, sigma: float, gamma: float, S_noise: float, generator):
    """Algorithm 2 lines 5-7: raise the noise level to sigma_hat = (1 + gamma) sigma by adding fresh noise."""
    if gamma == 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    eps = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator) * S_noise
    return x + math.sqrt(sigma_hat**2 - sigma**2) * eps, sigma_hat


@torch.no_grad()
def _edm(model, x, sigmas, second_order, callback, clip_x0, S_churn, S_min, S_max, S_noise, generator, progress):
    if S_churn < 0 or S_noise < 0:
        raise ValueError(f"S_churn and S_noise must be >= 0, got {S_churn}, {S_noise}")
    run = _Run(model, x, sigmas, callback, clip_x0, progress, ode=True)
    n = len(run.pairs)

    def step(x, i, sigma, sigma_next):
        gamma = _gamma(sigma, n, S_churn, S_min, S_max) if math.isfinite(sigma) else 0.0  # none at pure noise
        x, sigma_hat = _churn(x, sigma, gamma, S_noise, generator)
        if run.in_time and (sigma_next > 0 or math.isinf(sigma_hat)):
            return run.time_step(x, sigma_hat, sigma_next, second_order and sigma_next > 0)
        D = run.denoise(x, sigma_hat)
        d = (x - D) / sigma_hat  # dx/dsigma of the probability-flow ODE (Algorithm 2 line 7)
        x_next = x + (sigma_next - sigma_hat) * d
        # Heun's correction (lines 9-11) unless sigma_next = 0: there the Euler step lands on D, exactly.
        if second_order and sigma_next > 0:
            d2 = (x_next - run.denoise(x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * 0.5 * (d + d2)
        return x_next, D
    return run.loop(step)


def heun(model, x: torch.Tensor, sigmas, *, callback=None, clip_x0: bool = False, S_churn: float = 0.0,
         S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0,
         generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """EDM Algorithm 2 (Heun's 2nd-order method, optional churn); 2N - 1 evaluations when sigmas ends in 0."""
    return _edm(model, x, sigmas, True, callback, clip_x0, S_churn, S_min, S_max, S_noise, generator, progress)


def euler(model, x: torch.Tensor, sigmas, *, callback=None, clip_x0: bool = False, S_churn: float = 0.0,
          S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0,
          generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """Algorithm 2 without the 2nd-order correction (Euler's method, EDM section 3); N evaluations."""
    return _edm(model, x, sigmas, False, callback, clip_x0, S_churn, S_min, S_max, S_noise, generator, progress)


@torch.no_grad()
def ddim(model, x: torch.Tensor, sigmas, *, eta: float = 0.0, callback=None, clip_x0: bool = False,
         generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) on the sigma grid: x' = D + sigma_down eps_hat + sigma_up z, with
    sigma_up = eta sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2) (eq. 16 in these units) and
    sigma_down = sqrt(sigma'^2 - sigma_up^2). eta = 0 is deterministic, eta = 1 is DDPM's ancestral step."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    run = _Run(model, x, sigmas, callback, clip_x0, progress)

    def step(x, i, sigma, sigma_next):
        D = run.denoise(x, sigma)
        up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
        x_next = D + math.sqrt(sigma_next**2 - up**2) / sigma * (x - D)
        if up > 0:
            x_next = x_next + up * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        return x_next, D
    return run.loop(step)


def ddpm(model, x: torch.Tensor, sigmas, *, callback=None, clip_x0: bool = False,
         generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """Ancestral sampling from the posterior q(x_prev | x_t, x0_hat) (DDPM eqs. 6-7): ``ddim`` with eta = 1."""
    return ddim(model, x, sigmas, eta=1.0, callback=callback, clip_x0=clip_x0, generator=generator,
                progress=progress)


@torch.no_grad()
def dopri5(model, x: torch.Tensor, sigmas, *, rtol: float = 1e-5, atol: float = 1e-5, callback=None,
           clip_x0: bool = False, generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """Adaptive Dormand-Prince 5(4) (torchdiffeq) on dx/d(ln sigma) = x - D(x, sigma) from sigmas[0]
    to the last positive level (only the end points matter; SPEC tolerances), then the exact final
    step x = D when the grid ends in 0. On a model integrating in its own time: dx_t/dt = velocity, in t.
    The callback runs after every evaluation (i counts them)."""
    try:
        from torchdiffeq import odeint
    except ImportError as e:
        raise ImportError("the dopri5 sampler needs torchdiffeq: pip install torchdiffeq "
                          "(or sample with euler / heun / ddim)") from e
    run = _Run(model, x, sigmas, callback, clip_x0, False, ode=True)
    positive = [s for s in run.levels if s > 0]
    bar, evals = tqdm(desc="dopri5 evaluations", disable=not progress, leave=False), [0]
    field = _time_field(run, bar, evals) if run.in_time else _log_sigma_field(run, bar, evals)
    try:
        z = run.x
        if len(positive) > 1:
            ends = [run.model.time(s) for s in (positive[0], positive[-1])] if run.in_time else \
                [math.log(positive[0]), math.log(positive[-1])]
            z = z * run.model.state_scale(positive[0]) if run.in_time else z
            span = torch.tensor(ends, dtype=torch.float64).to(z.device, z.dtype)
            z = odeint(field, z, span, rtol=rtol, atol=atol, method="dopri5")[-1]
            z = z / run.model.state_scale(positive[-1]) if run.in_time else z
        return run.denoise(z, positive[-1]) if run.levels[-1] == 0 else z
    except _Stop as stop:
        return stop.denoised
    finally:
        bar.close()


def _log_sigma_field(run: _Run, bar, evals):
    """dx/d(ln sigma) = x - D(x, sigma), reporting each evaluation."""
    def field(log_sigma: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        sigma = math.exp(float(log_sigma))
        D = run.denoise(z, sigma)
        _evaluated(run, bar, evals, z, sigma, D)
        return z - D
    return field


def _time_field(run: _Run, bar, evals):
    """dx_t/dt = the model's velocity in its own time, reporting each evaluation in sigma units."""
    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        v, D = run.model.velocity(y, float(t), run.clip)
        sigma = run.model.sigma(float(t))
        _evaluated(run, bar, evals, y / run.model.state_scale(sigma), sigma, D)
        return v
    return field


def _evaluated(run: _Run, bar, evals, x, sigma: float, D) -> None:
    bar.update(1)
    run.report(evals[0], x, sigma, sigma, D)
    evals[0] += 1


SAMPLERS = {"ddim": ddim, "ddpm": ddpm, "euler": euler, "heun": heun, "dopri5": dopri5}


def get_sampler(name: str):
    """The sampler called ``name``; a ValueError naming the choices otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def sample(param, model, noise: torch.Tensor, steps: int | None = None, *, sampler: str = "euler",
           sigmas=None, **options) -> torch.Tensor:
    """Draw samples with any sampler from a native ``model(x_t, t, **cond)`` of ``param``'s objective.

    ``noise``: unit Gaussian noise (B, ...); the grid is ``sigmas`` or the objective's own
    ``param.grid(steps)``. The network is adapted once (``param.denoiser``), the state starts at
    ``param.prior_scale(sigmas[0]) * noise`` and the result is returned in the model's own units
    (x_t at the grid's last level: the sample when the grid ends in 0). ``options`` go to the sampler.
    A grid starting at sigma = inf (flow matching's t = 0, where x_t is the noise itself): the ODE
    samplers integrate from there in the objective's own time (``param.rates``); ddim / ddpm take the
    first step as the exact limit of DDIM, x = x0_hat + sigma_1 eps_hat, and run from sigma_1 on.
    """
    if sigmas is None:
        if steps is None:
            raise ValueError("pass steps (the objective's own grid) or sigmas")
        sigmas = param.grid(steps)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    noise = noise.to(torch.promote_types(noise.dtype, torch.float32))
    run = get_sampler(sampler)
    if not math.isinf(float(sigmas[0])):
        x = noise * param.prior_scale(float(sigmas[0]))
    elif param.ode_in_time and run in (euler, heun, dopri5):
        x = noise  # the unit noise x / sigma at sigma = inf (see the contract)
    else:
        x, sigmas = _from_pure_noise(param, model, noise, float(sigmas[1]), options.get("clip_x0", False)), sigmas[1:]
    out = run(param.denoiser(model), x, sigmas, **options) if len(sigmas) > 1 else x  # one step: done
    return out * float(param.scale(sigmas[-1:]).double())


@torch.no_grad()
def _from_pure_noise(param, model, noise: torch.Tensor, sigma_next: float, clip_x0: bool) -> torch.Tensor:
    """The state at sigma_next after DDIM's step from sigma = inf, where x_t = b(t0) noise (a = 0)."""
    t0 = param.time(torch.full((noise.shape[0],), math.inf, dtype=torch.float64, device=noise.device))
    t0 = t0.to(noise.dtype)
    x_t = noise * float(param.coeffs(t0[:1])[1])
    x0, eps = param.x0_eps(x_t, model(x_t, t0).to(x_t.dtype), t0)
    x0 = x0.clamp(-1, 1) if clip_x0 else x0
    return x0 + sigma_next * eps
